//! One `agentvm serve` process driven over its API socket, for tests that need several VMMs at
//! once (snapshots and their restores); the console goes to a file in the serve's own temp dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agentvm::{VmOutput, VmProcess};
use crate::api::{request, wait_for_listener, wait_for_text, ApiResponse};

/// Hang detectors, not performance limits.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Serve {
    process: VmProcess,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl Serve {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("api.sock");
        let console = dir.path().join("console");
        let process = VmProcess::agentvm([
            "serve".as_ref(),
            "--api-sock".as_ref(),
            sock.as_os_str(),
            "--console".as_ref(),
            console.as_os_str(),
        ])
        .expect("start agentvm serve");
        assert!(
            wait_for_listener(&sock, START_TIMEOUT),
            "the API socket {} did not appear",
            sock.display()
        );
        Self { process, sock, dir }
    }

    /// A path in this serve's temp dir (removed when the serve is dropped).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> ApiResponse {
        request(&self.sock, method, path, body)
    }

    /// Asserts a 204.
    pub fn ok(&self, method: &str, path: &str, body: &str) {
        let answer = self.call(method, path, Some(body));
        assert_eq!(answer.status, 204, "{method} {path} {body}: {answer:?}");
    }

    /// Asserts a `status` answer whose fault_message contains `needle`; returns the message.
    pub fn refused(
        &self,
        method: &str,
        path: &str,
        body: &str,
        status: u16,
        needle: &str,
    ) -> String {
        let answer = self.call(method, path, Some(body));
        assert_eq!(answer.status, status, "{method} {path} {body}: {answer:?}");
        let fault = answer.fault();
        assert!(
            fault.contains(needle),
            "{method} {path} {body}: {fault:?} lacks {needle:?}"
        );
        fault
    }

    /// GET /'s "state".
    pub fn state(&self) -> String {
        let answer = self.call("GET", "/", None);
        assert_eq!(answer.status, 200, "{answer:?}");
        answer.json()["state"].as_str().expect("state").to_string()
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.path("console")).unwrap_or_default()
    }

    pub fn wait_console(&self, needle: &str) -> String {
        wait_for_text(&self.path("console"), needle, GUEST_TIMEOUT)
            .unwrap_or_else(|| panic!("{needle:?} not on the console:\n{}", self.console()))
    }

    /// Ends the VMM with SIGTERM (it tears the VM down and flushes the console) and returns its
    /// output with its temp dir, which stays until the returned value is dropped.
    pub fn terminate(self) -> (VmOutput, tempfile::TempDir) {
        self.process
            .signal(libc::SIGTERM)
            .expect("signal agentvm serve");
        let out = self
            .process
            .wait(EXIT_TIMEOUT)
            .expect("agentvm serve exits after SIGTERM");
        (out, self.dir)
    }

    /// Waits for the serve to exit by itself (the VM ended), without signalling it.
    pub fn wait_exit(self) -> (VmOutput, tempfile::TempDir) {
        let out = self
            .process
            .wait(EXIT_TIMEOUT)
            .expect("agentvm serve exits by itself");
        (out, self.dir)
    }

    /// Kills the VMM with SIGKILL (no cleanup of its own) and returns its output and temp dir.
    pub fn kill(self) -> (VmOutput, tempfile::TempDir) {
        self.process
            .signal(libc::SIGKILL)
            .expect("signal agentvm serve");
        let out = self
            .process
            .wait(EXIT_TIMEOUT)
            .expect("agentvm serve exits after SIGKILL");
        (out, self.dir)
    }

    /// The VMM's process id (for /proc/<pid>/...).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn sock(&self) -> &Path {
        &self.sock
    }
}
