//! `PtyOpen`: controlling terminal, size and resize, input echo, TERM, hang-up, several at once.

mod common;

use agentvm_protocol::{Close, Data, ExitStatus, Message, ProcessSpec, PtyOpen, Resize, Stream};
use common::{argv, Client};

fn open(client: &mut Client, id: u64, spec: ProcessSpec, rows: u16, cols: u16) {
    client.send(PtyOpen {
        id,
        spec,
        term: "xterm-agentvm".into(),
        rows,
        cols,
    });
}

/// Terminal output of request `id` until it contains `needle` (granting window as it goes).
fn read_until(client: &mut Client, id: u64, needle: &str) -> String {
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains(needle) {
        match client.recv_for(id) {
            Message::Started(_) => {}
            Message::Data(d) => {
                assert_eq!(d.stream, Stream::Stdout);
                client.grant(id, Stream::Stdout, d.data.len() as u32);
                out.extend(d.data);
            }
            other => panic!(
                "waiting for {needle:?} in {:?}, got {other:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn type_in(client: &mut Client, id: u64, text: &str) {
    client.send(Data {
        id,
        stream: Stream::Stdin,
        data: text.as_bytes().to_vec(),
    });
}

#[test]
fn program_has_a_controlling_terminal_of_the_given_size_and_term() {
    let agent = common::Agent::start();
    let mut client = agent.connect();
    open(
        &mut client,
        1,
        argv(&[
            "sh",
            "-c",
            "tty; stty size; echo TERM=$TERM; tty -s && echo ctty",
        ]),
        24,
        80,
    );
    let result = client.collect(1);
    assert_eq!(result.status, Some(ExitStatus::Code(0)));
    let text = String::from_utf8_lossy(&result.stdout).replace("\r\n", "\n");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{text:?}");
    assert_eq!(lines[1], "24 80", "{text:?}");
    assert_eq!(lines[2], "TERM=xterm-agentvm");
    assert_eq!(lines[3], "ctty");
    assert!(result.stderr.is_empty());
}

#[test]
fn resize_is_seen_by_the_program_and_input_is_echoed() {
    let agent = common::Agent::start();
    let mut client = agent.connect();
    open(
        &mut client,
        1,
        argv(&[
            "sh",
            "-c",
            "stty size; read line; echo got:$line; stty size",
        ]),
        30,
        100,
    );
    read_until(&mut client, 1, "30 100");
    client.send(Resize {
        id: 1,
        rows: 50,
        cols: 132,
    });
    type_in(&mut client, 1, "hello\n");
    let text = read_until(&mut client, 1, "50 132");
    // The terminal echoes what was typed, then the program answers.
    let echo = text.find("hello").expect("echo");
    let answer = text.find("got:hello").expect("answer");
    assert!(echo < answer, "{text:?}");
    let result = client.collect(1);
    assert_eq!(result.status, Some(ExitStatus::Code(0)));
}

#[test]
fn close_hangs_up_and_several_ptys_run_at_once() {
    let agent = common::Agent::start();
    let mut client = agent.connect();
    for id in 1..=3 {
        open(
            &mut client,
            id,
            argv(&["sh", "-c", "tty; exec cat"]),
            24,
            80,
        );
    }
    let mut ttys = Vec::new();
    for id in 1..=3 {
        let text = read_until(&mut client, id, "\n");
        ttys.push(text.trim().to_string());
    }
    ttys.sort();
    ttys.dedup();
    assert_eq!(ttys.len(), 3, "{ttys:?}");
    for id in 1..=3 {
        type_in(&mut client, id, &format!("line{id}\n"));
        // Echo and cat's copy.
        let text = read_until(&mut client, id, &format!("line{id}\r\nline{id}"));
        assert!(text.contains(&format!("line{id}")));
    }
    for id in 1..=3 {
        client.send(Close { id });
        let result = client.collect(id);
        assert_eq!(result.status, Some(ExitStatus::Signal(libc::SIGHUP)));
    }
}

#[test]
fn pty_timeout_kills_the_session() {
    let agent = common::Agent::start();
    let mut client = agent.connect();
    let mut spec = argv(&["sleep", "1000"]);
    spec.timeout_ms = Some(100);
    open(&mut client, 1, spec, 24, 80);
    let result = client.collect(1);
    assert!(result.timed_out);
    assert_eq!(result.status, Some(ExitStatus::Signal(libc::SIGKILL)));
}
