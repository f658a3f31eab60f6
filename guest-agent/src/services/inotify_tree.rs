//! Watches a directory tree with inotify and turns raw inotify events into the protocol's
//! [`WatchEvent`]s with absolute paths.
//!
//! - Recursive: every directory is watched (excluded trees are skipped), including directories
//!   created or moved in later. A new directory is scanned right after its watch is added, so
//!   entries created inside it before the watch existed are still reported (entries the scan
//!   found are not reported twice when their own event arrives).
//! - `Modified` comes from `IN_MODIFY` (each write), not `IN_CLOSE_WRITE`: a long-running
//!   writer (a log, a database) that never closes its file is still seen; all writes to a file
//!   within one batch (see [`InotifyTree::start_new_batch`]) are one event.
//! - Renames: `IN_MOVED_FROM`/`IN_MOVED_TO` with the same cookie become one `Moved`. A
//!   `MOVED_FROM` whose partner has not arrived stays pending until
//!   [`InotifyTree::flush_unpaired`] (the watch loop calls it once a batch window closes): then
//!   it is a move out of the tree, reported as `Deleted`. A `MOVED_TO` without partner is a move
//!   in, reported as `Created` (for a directory, with `Created` for what it holds).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use agentvm_protocol::{ErrorCode, WatchEvent};
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use super::glob_filter::GlobFilter;
use super::service_error::{os_reason, require_absolute, ServiceError};

/// Enough for hundreds of events per read; the kernel never splits an event across reads.
const READ_BUFFER: usize = 64 * 1024;

fn dir_mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::MODIFY
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::ONLYDIR
        | WatchMask::DONT_FOLLOW
        | WatchMask::EXCL_UNLINK
}

/// One raw event, copied out of the read buffer.
struct RawEvent {
    wd: WatchDescriptor,
    mask: EventMask,
    cookie: u32,
    name: Option<OsString>,
}

pub struct InotifyTree {
    inotify: Inotify,
    root: PathBuf,
    recursive: bool,
    filter: GlobFilter,
    /// Absolute path of every watched directory.
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// `MOVED_FROM`s waiting for their `MOVED_TO`: cookie, old path, is_dir.
    pending_moves: Vec<(u32, PathBuf, bool)>,
    /// Entries reported by scanning a new directory, whose own `IN_CREATE` may still come.
    scanned: HashSet<PathBuf>,
    /// Files already reported `Modified` in the batch being gathered: more writes to them add
    /// nothing until the batch is sent.
    modified_in_batch: HashSet<PathBuf>,
    buffer: Vec<u8>,
}

impl InotifyTree {
    /// Watches `root` (a directory), and with `recursive` everything below it. Returns once every
    /// watch is in place.
    pub fn new(root: &str, recursive: bool, filter: GlobFilter) -> Result<Self, ServiceError> {
        let root_path = require_absolute(root, "watch")?.to_path_buf();
        let meta =
            fs::metadata(&root_path).map_err(|e| ServiceError::io("watch", &root_path, &e))?;
        if !meta.is_dir() {
            return Err(ServiceError::invalid(format!(
                "cannot watch {root}: not a directory"
            )));
        }
        let inotify = Inotify::init().map_err(|e| watch_error(&root_path, &e))?;
        let mut tree = Self {
            inotify,
            root: root_path.clone(),
            recursive,
            filter,
            dirs: HashMap::new(),
            pending_moves: Vec::new(),
            scanned: HashSet::new(),
            modified_in_batch: HashSet::new(),
            buffer: vec![0; READ_BUFFER],
        };
        // The root may be a symlink to a directory: follow it there only.
        let mask = dir_mask() & !WatchMask::DONT_FOLLOW;
        let wd = tree
            .inotify
            .watches()
            .add(&root_path, mask)
            .map_err(|e| watch_error(&root_path, &e))?;
        tree.dirs.insert(wd, root_path.clone());
        if recursive {
            tree.watch_below(&root_path, None)?;
        }
        Ok(tree)
    }

    /// The inotify descriptor, readable when events are queued (for `poll`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// Number of directories watched.
    pub fn watched_dirs(&self) -> usize {
        self.dirs.len()
    }

    /// Whether `MOVED_FROM`s wait for a partner (the caller should flush them soon).
    pub fn has_unpaired_moves(&self) -> bool {
        !self.pending_moves.is_empty()
    }

    /// Reads every queued event without blocking and appends what they mean to `out`.
    pub fn read_events(&mut self, out: &mut Vec<WatchEvent>) -> io::Result<()> {
        loop {
            let raw: Vec<RawEvent> = match self.inotify.read_events(&mut self.buffer) {
                Ok(events) => events
                    .map(|e| RawEvent {
                        wd: e.wd,
                        mask: e.mask,
                        cookie: e.cookie,
                        name: e.name.map(|n| n.to_os_string()),
                    })
                    .collect(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for event in raw {
                self.handle(event, out);
            }
        }
    }

    /// The gathered events were sent: later writes are reported again.
    pub fn start_new_batch(&mut self) {
        self.modified_in_batch.clear();
    }

    /// Moves whose partner never came left the tree: report them as deletions.
    pub fn flush_unpaired(&mut self, out: &mut Vec<WatchEvent>) {
        for (_, from, is_dir) in std::mem::take(&mut self.pending_moves) {
            if is_dir {
                self.unwatch_below(&from);
            }
            self.report(
                out,
                WatchEvent::Deleted {
                    path: display(&from),
                    is_dir,
                },
            );
        }
        self.scanned.clear();
    }

    fn handle(&mut self, event: RawEvent, out: &mut Vec<WatchEvent>) {
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            out.push(WatchEvent::Overflow);
            return;
        }
        if event.mask.contains(EventMask::IGNORED) {
            self.dirs.remove(&event.wd);
            return;
        }
        let Some(dir) = self.dirs.get(&event.wd).cloned() else {
            return;
        };
        let is_dir = event.mask.contains(EventMask::ISDIR);
        let Some(name) = event.name else {
            // About a watched directory itself; its parent's watch reports everything but the
            // deletion of the root.
            if event.mask.contains(EventMask::DELETE_SELF) && dir == self.root {
                out.push(WatchEvent::Deleted {
                    path: display(&dir),
                    is_dir: true,
                });
            }
            return;
        };
        let path = dir.join(name);
        if event.mask.contains(EventMask::CREATE) {
            if self.scanned.remove(&path) {
                return;
            }
            self.report_created(out, &path, is_dir);
        } else if event.mask.contains(EventMask::MODIFY) {
            let modified = WatchEvent::Modified {
                path: display(&path),
            };
            if self.modified_in_batch.insert(path) {
                self.report(out, modified);
            }
        } else if event.mask.contains(EventMask::DELETE) {
            self.report(
                out,
                WatchEvent::Deleted {
                    path: display(&path),
                    is_dir,
                },
            );
        } else if event.mask.contains(EventMask::MOVED_FROM) {
            self.pending_moves.push((event.cookie, path, is_dir));
        } else if event.mask.contains(EventMask::MOVED_TO) {
            let partner = self
                .pending_moves
                .iter()
                .position(|(cookie, _, _)| *cookie == event.cookie);
            match partner {
                Some(i) => {
                    let (_, from, _) = self.pending_moves.remove(i);
                    if is_dir {
                        self.rename_watched(&from, &path);
                    }
                    self.report_move(out, from, path, is_dir);
                }
                None => {
                    self.report_created(out, &path, is_dir);
                }
            }
        }
    }

    /// Reports a rename if either end passes the filter.
    /// `path` appeared (created, or moved in from outside the tree); a new directory is watched
    /// too, and what it already holds is reported as created.
    fn report_created(&mut self, out: &mut Vec<WatchEvent>, path: &Path, is_dir: bool) {
        self.report(
            out,
            WatchEvent::Created {
                path: display(path),
                is_dir,
            },
        );
        if is_dir {
            self.watch_new_dir(path, Some(out));
        }
    }

    fn report_move(&mut self, out: &mut Vec<WatchEvent>, from: PathBuf, to: PathBuf, is_dir: bool) {
        self.modified_in_batch.remove(&from);
        self.modified_in_batch.remove(&to);
        if self.passes(&from) || self.passes(&to) {
            out.push(WatchEvent::Moved {
                from: display(&from),
                to: display(&to),
                is_dir,
            });
        }
    }

    fn report(&mut self, out: &mut Vec<WatchEvent>, event: WatchEvent) {
        let path = match &event {
            WatchEvent::Created { path, .. } | WatchEvent::Deleted { path, .. } => {
                // A later write to a new file at this path is news again.
                self.modified_in_batch.remove(Path::new(path));
                Path::new(path)
            }
            WatchEvent::Modified { path } => Path::new(path),
            WatchEvent::Moved { .. } | WatchEvent::Overflow => {
                out.push(event);
                return;
            }
        };
        if self.passes(path) {
            out.push(event);
        }
    }

    fn relative<'p>(&self, path: &'p Path) -> Option<&'p Path> {
        path.strip_prefix(&self.root).ok()
    }

    fn passes(&self, path: &Path) -> bool {
        match self.relative(path) {
            // The root itself (e.g. its deletion) is always reported.
            Some(rel) if rel.as_os_str().is_empty() => true,
            Some(rel) => self.filter.reports(rel),
            None => false,
        }
    }

    fn excluded(&self, path: &Path) -> bool {
        self.relative(path)
            .is_some_and(|rel| self.filter.excludes(rel))
    }

    /// A directory appeared at run time (created, or moved in): watch it and, when `created` is
    /// given, report what it holds (entries created, or moved in with it, before the watch
    /// existed: all new to the tree).
    fn watch_new_dir(&mut self, dir: &Path, created: Option<&mut Vec<WatchEvent>>) {
        if !self.recursive || self.excluded(dir) {
            return;
        }
        // Errors here mean the directory is already gone again (its deletion is reported by
        // the parent's watch) or the watch limit is reached, which the kernel reports with an
        // overflow only if events are lost; report it as one so the host knows to rescan.
        let mut found = Vec::new();
        let watched = self
            .add_watch(dir)
            .and_then(|_| self.watch_below(dir, Some(&mut found)));
        match (watched, created) {
            (Ok(()), Some(out)) => {
                for (path, is_dir) in found {
                    self.scanned.insert(path.clone());
                    self.report(
                        out,
                        WatchEvent::Created {
                            path: display(&path),
                            is_dir,
                        },
                    );
                }
            }
            (Err(e), Some(out)) if e.code == ErrorCode::ResourceLimit => {
                out.push(WatchEvent::Overflow)
            }
            _ => {}
        }
    }

    fn add_watch(&mut self, dir: &Path) -> Result<(), ServiceError> {
        match self.inotify.watches().add(dir, dir_mask()) {
            Ok(wd) => {
                self.dirs.insert(wd, dir.to_path_buf());
                Ok(())
            }
            Err(e) => Err(watch_error(dir, &e)),
        }
    }

    /// Watches every directory below `dir` (not `dir` itself), depth first, collecting every
    /// entry met into `found` when given. Entries that vanish meanwhile are skipped.
    fn watch_below(
        &mut self,
        dir: &Path,
        mut found: Option<&mut Vec<(PathBuf, bool)>>,
    ) -> Result<(), ServiceError> {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(current) = stack.pop() {
            let entries = match fs::read_dir(&current) {
                Ok(entries) => entries,
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(watch_error(&current, &e)),
            };
            for entry in entries {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) if vanished(&e) => continue,
                    Err(e) => return Err(watch_error(&current, &e)),
                };
                let path = entry.path();
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if let Some(found) = found.as_deref_mut() {
                    found.push((path.clone(), is_dir));
                }
                if is_dir && !self.excluded(&path) {
                    match self.add_watch(&path) {
                        Ok(()) => stack.push(path),
                        Err(e) if e.code == ErrorCode::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// A watched directory moved within the tree: its watches follow the inodes, so only the
    /// paths we remember change.
    fn rename_watched(&mut self, from: &Path, to: &Path) {
        for path in self.dirs.values_mut() {
            if let Ok(rest) = path.strip_prefix(from) {
                *path = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
    }

    /// A directory left the tree: stop watching it and what is below it.
    fn unwatch_below(&mut self, dir: &Path) {
        let gone: Vec<WatchDescriptor> = self
            .dirs
            .iter()
            .filter(|(_, path)| path.starts_with(dir))
            .map(|(wd, _)| wd.clone())
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            // It may be gone already (deleted after the move): nothing left to undo then.
            let _ = self.inotify.watches().remove(wd);
        }
    }
}

fn vanished(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

fn watch_error(path: &Path, e: &io::Error) -> ServiceError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => ServiceError::new(
            ErrorCode::ResourceLimit,
            format!(
                "cannot watch {}: the inotify watch limit is reached (fs.inotify.max_user_watches)",
                path.display()
            ),
        ),
        Some(libc::EMFILE) => ServiceError::new(
            ErrorCode::ResourceLimit,
            format!(
                "cannot watch {}: too many inotify instances (fs.inotify.max_user_instances): {}",
                path.display(),
                os_reason(e)
            ),
        ),
        _ => ServiceError::io("watch", path, e),
    }
}

fn display(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::fd::poll_ready;
    use std::time::Duration;

    /// Upper bound for events to show up; reaching it fails the test (never a pass condition).
    const PATIENCE: Duration = Duration::from_secs(10);

    struct Fixture {
        dir: tempfile::TempDir,
        tree: InotifyTree,
        events: Vec<WatchEvent>,
    }

    impl Fixture {
        fn new(recursive: bool, include: &[&str], exclude: &[&str]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            Self::in_dir(dir, recursive, include, exclude)
        }

        fn in_dir(
            dir: tempfile::TempDir,
            recursive: bool,
            include: &[&str],
            exclude: &[&str],
        ) -> Self {
            let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            let filter = GlobFilter::new(&own(include), &own(exclude)).unwrap();
            let tree = InotifyTree::new(dir.path().to_str().unwrap(), recursive, filter).unwrap();
            Self {
                dir,
                tree,
                events: Vec::new(),
            }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        fn abs(&self, rel: &str) -> String {
            display(&self.path(rel))
        }

        /// Creates `rel` as a marker and collects events until its creation is seen: inotify
        /// queues events in order, so everything caused before the marker is collected too.
        fn settle(&mut self, marker: &str) -> Vec<WatchEvent> {
            fs::write(self.path(marker), b"").unwrap();
            let wanted = WatchEvent::Created {
                path: self.abs(marker),
                is_dir: false,
            };
            while !self.events.contains(&wanted) {
                let ready = poll_ready(&[(self.tree.fd(), libc::POLLIN)], Some(PATIENCE)).unwrap();
                assert!(
                    ready[0],
                    "no inotify event within {PATIENCE:?}: {:?}",
                    self.events
                );
                self.tree.read_events(&mut self.events).unwrap();
            }
            self.tree.flush_unpaired(&mut self.events);
            self.tree.start_new_batch();
            let mut events = std::mem::take(&mut self.events);
            events.retain(|e| *e != wanted);
            events
        }
    }

    fn created(path: String, is_dir: bool) -> WatchEvent {
        WatchEvent::Created { path, is_dir }
    }

    #[test]
    fn reports_create_modify_delete_in_a_new_subdirectory() {
        let mut fx = Fixture::new(true, &[], &[]);
        // Everything below `a` exists before the agent sees `a`'s creation: found by the scan.
        fs::create_dir(fx.path("a")).unwrap();
        fs::write(fx.path("a/f"), b"1").unwrap();
        fs::create_dir(fx.path("a/b")).unwrap();
        fs::write(fx.path("a/b/c"), b"1").unwrap();
        let mut events = fx.settle("m1");
        events.sort_by_key(|e| format!("{e:?}"));
        let mut expected = vec![
            created(fx.abs("a"), true),
            created(fx.abs("a/f"), false),
            created(fx.abs("a/b"), true),
            created(fx.abs("a/b/c"), false),
        ];
        expected.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(events, expected);
        assert_eq!(fx.tree.watched_dirs(), 3);

        // The new directories are watched themselves.
        fs::write(fx.path("a/b/c"), b"22").unwrap();
        fs::write(fx.path("a/b/d"), b"").unwrap();
        fs::remove_file(fx.path("a/b/c")).unwrap();
        fs::remove_file(fx.path("a/b/d")).unwrap();
        fs::remove_dir(fx.path("a/b")).unwrap();
        let events = fx.settle("m2");
        assert_eq!(
            events,
            vec![
                WatchEvent::Modified {
                    path: fx.abs("a/b/c")
                },
                created(fx.abs("a/b/d"), false),
                WatchEvent::Deleted {
                    path: fx.abs("a/b/c"),
                    is_dir: false
                },
                WatchEvent::Deleted {
                    path: fx.abs("a/b/d"),
                    is_dir: false
                },
                WatchEvent::Deleted {
                    path: fx.abs("a/b"),
                    is_dir: true
                },
            ]
        );
    }

    #[test]
    fn pairs_moves_and_follows_moved_directories() {
        let outside = tempfile::tempdir().unwrap();
        let mut fx = Fixture::new(true, &[], &[]);
        fs::write(fx.path("f"), b"").unwrap();
        fs::create_dir(fx.path("d1")).unwrap();
        fx.settle("m0");

        fs::rename(fx.path("f"), fx.path("g")).unwrap();
        fs::rename(fx.path("d1"), fx.path("d2")).unwrap();
        fs::write(fx.path("d2/x"), b"").unwrap();
        let events = fx.settle("m1");
        assert_eq!(
            events,
            vec![
                WatchEvent::Moved {
                    from: fx.abs("f"),
                    to: fx.abs("g"),
                    is_dir: false
                },
                WatchEvent::Moved {
                    from: fx.abs("d1"),
                    to: fx.abs("d2"),
                    is_dir: true
                },
                created(fx.abs("d2/x"), false),
            ]
        );

        // Out of the tree: Deleted, and the directory is no longer watched.
        fs::rename(fx.path("d2"), outside.path().join("d2")).unwrap();
        fs::rename(fx.path("g"), outside.path().join("g")).unwrap();
        let events = fx.settle("m2");
        assert_eq!(
            events,
            vec![
                WatchEvent::Deleted {
                    path: fx.abs("d2"),
                    is_dir: true
                },
                WatchEvent::Deleted {
                    path: fx.abs("g"),
                    is_dir: false
                },
            ]
        );
        assert_eq!(fx.tree.watched_dirs(), 1);
        fs::write(outside.path().join("d2/ignored"), b"").unwrap();

        // Into the tree: Created, and a moved-in directory gets watched.
        fs::rename(outside.path().join("d2"), fx.path("back")).unwrap();
        fs::write(fx.path("back/y"), b"").unwrap();
        let mut events = fx.settle("m3");
        assert_eq!(events.remove(0), created(fx.abs("back"), true));
        events.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            events,
            vec![
                created(fx.abs("back/ignored"), false),
                created(fx.abs("back/x"), false),
                created(fx.abs("back/y"), false),
            ]
        );
    }

    #[test]
    fn filters_and_skips_excluded_trees() {
        let mut fx = Fixture::new(true, &["**/*.txt"], &["skip"]);
        fs::create_dir(fx.path("skip")).unwrap();
        fs::write(fx.path("skip/a.txt"), b"").unwrap();
        fs::create_dir(fx.path("keep")).unwrap();
        fs::write(fx.path("keep/b.txt"), b"").unwrap();
        fs::write(fx.path("c.rs"), b"").unwrap();
        fs::write(fx.path("d.txt"), b"").unwrap();
        let events = fx.settle("m1.txt");
        assert_eq!(
            events,
            vec![
                created(fx.abs("keep/b.txt"), false),
                created(fx.abs("d.txt"), false)
            ]
        );
        assert_eq!(fx.tree.watched_dirs(), 2, "root and keep, not skip");
    }

    #[test]
    fn existing_trees_are_watched_and_non_recursive_watches_stay_shallow() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("x/y")).unwrap();
        let mut fx = Fixture::in_dir(dir, true, &[], &[]);
        assert_eq!(fx.tree.watched_dirs(), 3);
        fs::write(fx.path("x/y/z"), b"").unwrap();
        assert_eq!(fx.settle("m1"), vec![created(fx.abs("x/y/z"), false)]);

        let mut shallow = Fixture::new(false, &[], &[]);
        fs::create_dir(shallow.path("a")).unwrap();
        fs::write(shallow.path("a/f"), b"").unwrap();
        let events = shallow.settle("m1");
        assert_eq!(events, vec![created(shallow.abs("a"), true)]);
        fs::write(shallow.path("a/g"), b"").unwrap();
        assert_eq!(shallow.settle("m2"), vec![]);
        assert_eq!(shallow.tree.watched_dirs(), 1);
    }

    #[test]
    fn writes_within_a_batch_are_one_modified_event_per_file() {
        use std::io::Write;
        let mut fx = Fixture::new(false, &[], &[]);
        let mut a = fs::File::create(fx.path("a")).unwrap();
        let mut b = fs::File::create(fx.path("b")).unwrap();
        fx.settle("m0");
        for _ in 0..100 {
            a.write_all(b"x").unwrap();
            b.write_all(b"x").unwrap();
        }
        // A file deleted and created again is news, and so are its writes.
        fs::remove_file(fx.path("a")).unwrap();
        let mut a = fs::File::create(fx.path("a")).unwrap();
        a.write_all(b"y").unwrap();
        let root = display(fx.dir.path());
        let modified = |rel: &str| WatchEvent::Modified {
            path: format!("{root}/{rel}"),
        };
        let events = fx.settle("m1");
        assert_eq!(
            events,
            vec![
                modified("a"),
                modified("b"),
                WatchEvent::Deleted {
                    path: fx.abs("a"),
                    is_dir: false
                },
                created(fx.abs("a"), false),
                modified("a"),
            ]
        );
        // The next batch reports writes again.
        b.write_all(b"z").unwrap();
        let events = fx.settle("m2");
        assert_eq!(events, vec![modified("b")]);
    }

    #[test]
    fn a_full_kernel_queue_is_reported_as_overflow() {
        use std::io::Write;
        let limit: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut fx = Fixture::new(false, &[], &[]);
        let mut a = fs::File::create(fx.path("a")).unwrap();
        let mut b = fs::File::create(fx.path("b")).unwrap();
        // Alternating files: the kernel merges only identical consecutive events.
        for _ in 0..limit / 2 + 1 {
            a.write_all(b"x").unwrap();
            b.write_all(b"x").unwrap();
        }
        let mut events = Vec::new();
        fx.tree.read_events(&mut events).unwrap();
        assert_eq!(events.last(), Some(&WatchEvent::Overflow));
        assert_eq!(events[0], created(fx.abs("a"), false));
    }

    #[test]
    fn bad_roots_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"").unwrap();
        let err = InotifyTree::new(file.to_str().unwrap(), true, GlobFilter::default())
            .err()
            .unwrap();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert_eq!(
            err.message,
            format!("cannot watch {}: not a directory", file.display())
        );
        let missing = dir.path().join("missing");
        let err = InotifyTree::new(missing.to_str().unwrap(), true, GlobFilter::default())
            .err()
            .unwrap();
        assert_eq!(err.code, ErrorCode::NotFound);
        assert!(err.message.contains("missing"));
        let err = InotifyTree::new("rel", true, GlobFilter::default())
            .err()
            .unwrap();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
    }
}
