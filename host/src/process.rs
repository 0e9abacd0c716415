//! A `goutube` child process that announces itself with a listening line (`goutube run`, and
//! the benchmark's baseline server): started, found through that line, signalled, stopped.
//! The integration tests, `goutube bench` and the plugin benchmark all use this one harness.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::node::Addresses;

/// Why a child process could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("spawning {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// It did not say where it listens in time.
    #[error("{program} printed no listening line within {timeout:?} (exit status: {status:?})")]
    NoListeningLine {
        /// The program.
        program: String,
        /// How long it was given.
        timeout: Duration,
        /// Its exit status, if it exited.
        status: Option<ExitStatus>,
    },
    /// A signal could not be sent.
    #[error("signalling process {pid}: {source}")]
    Signal {
        /// The process.
        pid: u32,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// It did not exit in time.
    #[error("process {pid} did not exit within {timeout:?}")]
    Timeout {
        /// The process.
        pid: u32,
        /// How long it was given.
        timeout: Duration,
    },
    /// Waiting for it failed.
    #[error("waiting for process {pid}: {source}")]
    Wait {
        /// The process.
        pid: u32,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

/// A running child; killed (SIGKILL) and reaped when dropped.
pub struct NodeProcess {
    child: Child,
    line: String,
}

impl NodeProcess {
    /// Runs `command` with stdout piped and waits up to `timeout` for its `goutube listening …`
    /// line. The rest of stdout is drained in the background, so the child never blocks on it.
    pub fn start(mut command: Command, timeout: Duration) -> Result<NodeProcess, ProcessError> {
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child =
            command
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|source| ProcessError::Spawn {
                    program: program.clone(),
                    source,
                })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("goutube listening") {
                    let _ = tx.send(line);
                }
            }
        });
        match rx.recv_timeout(timeout) {
            Ok(line) => Ok(NodeProcess { child, line }),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                Err(ProcessError::NoListeningLine {
                    program,
                    timeout,
                    status,
                })
            }
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The listening line as printed.
    pub fn line(&self) -> &str {
        &self.line
    }

    /// The value of `name=` on the listening line.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    }

    /// Every address of a node's listening line (`None` for a line with fewer fields).
    pub fn addresses(&self) -> Option<Addresses> {
        Addresses::parse_listening_line(&self.line)
    }

    /// Sends `signal` (`libc::SIGHUP`, `libc::SIGTERM`, …).
    pub fn signal(&self, signal: libc::c_int) -> Result<(), ProcessError> {
        let pid = self.child.id();
        // SAFETY: kill(2) with the pid of a child this value owns and has not reaped.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            return Err(ProcessError::Signal {
                pid,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// SIGKILL: no chance to flush or announce anything.
    pub fn kill(mut self) -> Result<(), ProcessError> {
        let pid = self.child.id();
        self.child
            .kill()
            .map_err(|source| ProcessError::Signal { pid, source })?;
        self.child
            .wait()
            .map_err(|source| ProcessError::Wait { pid, source })?;
        Ok(())
    }

    /// SIGTERM, then waits up to `timeout` for the exit; returns its status.
    pub fn terminate(mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        self.signal(libc::SIGTERM)?;
        self.wait(timeout)
    }

    /// Waits up to `timeout` for the process to exit (by itself, or after a signal); returns
    /// its status.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        let pid = self.child.id();
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => return Err(ProcessError::Timeout { pid, timeout }),
                Err(source) => return Err(ProcessError::Wait { pid, source }),
            }
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
