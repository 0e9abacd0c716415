//! The README, run as written: every command of its ```` ```sh ```` blocks, in order, in one
//! shell in a temporary directory, as a reader with a few terminals would run them. Drift in
//! the README (a command that no longer exists, a flag renamed, a config key that moved, a step
//! that fails after the one before) fails here instead of for a user.
//!
//! What the runner does beyond typing the commands, and nothing else:
//! - `scripts/node …` runs in the terminal its comment names (`# terminal 2`; terminal 1 when
//!   none): in the background, its output in `terminal-N.log`. Starting one in a terminal stops
//!   the node already there with Ctrl-C (SIGINT), as a reader would, and it must exit cleanly.
//!   `scripts/node` runs the binary these tests built (`GOUTUBE_BIN`, which it documents), and
//!   `target/release/goutube` is that binary too: no release build inside the tests.
//! - Before the next command, every running node must have logged that it is ready (its ring is
//!   formed), so a command never races a node that is still starting.
//! - `scripts/test` is this test's own command: skipped. `xdg-open URL` (a browser) is a
//!   stand-in that fetches the page and checks that it is one.
//! - Every command must exit with status 0, except one followed by a `# -> OUTPUT` line: then
//!   its output (stdout and stderr) must hold OUTPUT, where `…` stands for anything.
//! - At the end every node is stopped with Ctrl-C and must exit with status 0.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use goutube_tests::goutube_bin;

/// How long one command may take: a 50 MB put and get with a debug build, ffmpeg encoding 30 s
/// of test video, a leader handing its group over at Ctrl-C.
const COMMAND_DEADLINE: Duration = Duration::from_secs(120);

/// How long a node may take to log that it is ready.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// The line a node logs once its ring is formed and health reports `SERVING`.
const READY: &str = "ready: the ring is formed";

/// One command of a block, as the shell reads it.
#[derive(Debug, PartialEq)]
struct Step {
    /// The README's heading above the block, for messages.
    section: String,
    /// The command's text: one line, or several (a heredoc, a loop).
    command: String,
    /// The `# -> ` line after it, if any.
    expect: Option<String>,
}

/// The commands of every `sh` block of `readme`, in order.
fn steps(readme: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut section = String::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if line.starts_with('#') {
            section = line.trim_start_matches('#').trim().to_owned();
            continue;
        }
        if line.starts_with("```") && line.trim() != "```sh" {
            // Another language's block: not commands, and its `#` lines are not headings.
            for line in lines.by_ref() {
                if line.trim() == "```" {
                    break;
                }
            }
            continue;
        }
        if line.trim() != "```sh" {
            continue;
        }
        let mut command = String::new();
        // The word that ends an open heredoc, and how many loops are open.
        let mut heredoc: Option<String> = None;
        let mut loops = 0usize;
        for line in lines.by_ref() {
            if heredoc.is_none() && loops == 0 && command.is_empty() {
                if line.trim() == "```" {
                    break;
                }
                if let Some(expect) = line.trim().strip_prefix("# -> ") {
                    let step = steps.last_mut().expect("a `# ->` line follows a command");
                    assert!(step.expect.is_none(), "one `# ->` line per command: {line}");
                    step.expect = Some(expect.to_owned());
                    continue;
                }
                if line.trim_start().starts_with('#') || line.trim().is_empty() {
                    continue;
                }
            }
            command.push_str(line);
            command.push('\n');
            if let Some(end) = &heredoc {
                if line.trim() == end {
                    heredoc = None;
                }
            } else {
                let code = line.split(" #").next().unwrap_or_default().trim();
                if code.starts_with("for ") || code.starts_with("while ") {
                    loops += 1;
                }
                if code == "done" || code.starts_with("done ") {
                    loops -= 1;
                }
                if let Some((_, word)) = code.split_once("<<") {
                    let word = word
                        .split_whitespace()
                        .next()
                        .expect("a heredoc's end word");
                    heredoc = Some(word.trim_matches(|c| c == '\'' || c == '"').to_owned());
                }
            }
            if heredoc.is_none() && loops == 0 {
                steps.push(Step {
                    section: section.clone(),
                    command: std::mem::take(&mut command),
                    expect: None,
                });
            }
        }
    }
    steps
}

/// Whether `output` holds `expected`, where `…` in `expected` stands for anything.
fn matches(output: &str, expected: &str) -> bool {
    let mut rest = output;
    for fragment in expected.split('…').map(str::trim).filter(|f| !f.is_empty()) {
        match rest.find(fragment) {
            Some(at) => rest = &rest[at + fragment.len()..],
            None => return false,
        }
    }
    true
}

/// The terminal a `scripts/node` line runs in (`# terminal N`; 1 without a comment).
fn terminal(command: &str) -> u32 {
    command
        .split_once("# terminal ")
        .map(|(_, rest)| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().expect("`# terminal N` names a number")
        })
        .unwrap_or(1)
}

/// A bash process the commands are typed into, one at a time; it answers on its stdout with
/// lines the runner asks it to print.
struct Shell {
    child: Child,
    input: ChildStdin,
    answers: mpsc::Receiver<String>,
    dir: PathBuf,
    /// The node running in each terminal: (terminal, pid).
    nodes: Vec<(u32, u32)>,
    /// The step counter, for output file names.
    count: usize,
}

impl Shell {
    fn start(dir: &Path, bin_dir: &Path) -> Shell {
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = Command::new("bash")
            .args(["--noprofile", "--norc"])
            .current_dir(dir)
            .env("PATH", path)
            .env("GOUTUBE_BIN", goutube_bin())
            .env_remove("GOUTUBE_CLIENT_ADDR")
            .env_remove("GOUTUBE_LOG__LEVEL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("bash");
        let input = child.stdin.take().expect("bash's stdin");
        let output = child.stdout.take().expect("bash's stdout");
        let (send, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        Shell {
            child,
            input,
            answers,
            dir: dir.to_owned(),
            nodes: Vec::new(),
            count: 0,
        }
    }

    /// Types `script` and returns the answer it prints after `marker `.
    fn ask(&mut self, script: &str, marker: &str, within: Duration, what: &str) -> String {
        self.input
            .write_all(script.as_bytes())
            .and_then(|()| self.input.flush())
            .expect("typing into bash");
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.answers.recv_timeout(left) {
                Ok(line) => {
                    if let Some(answer) = line.strip_prefix(&format!("{marker} ")) {
                        return answer.to_owned();
                    }
                }
                Err(_) => panic!("{what}: no answer within {within:?}\n{}", self.logs()),
            }
        }
    }

    /// Runs one command in the foreground; returns its exit status and output.
    fn run(&mut self, command: &str) -> (i32, String) {
        self.count += 1;
        let output = self.dir.join(format!("step-{}.out", self.count));
        let script = format!(
            "{{\n{command}}} > {} 2>&1 < /dev/null\necho \"__status $?\"\n",
            output.display()
        );
        let status = self.ask(&script, "__status", COMMAND_DEADLINE, command.trim());
        let printed = std::fs::read_to_string(&output).unwrap_or_default();
        (status.parse().expect("a status"), printed)
    }

    /// Starts `command` (`scripts/node …`) in the background in `terminal`, stopping the node
    /// there first.
    fn start_node(&mut self, command: &str, terminal: u32) {
        self.stop_node(terminal);
        let code = command.split(" #").next().expect("a command").trim();
        let log = self.log(terminal);
        let _ = std::fs::remove_file(&log);
        let script = format!(
            "{code} > {} 2>&1 < /dev/null &\necho \"__pid $!\"\n",
            log.display()
        );
        let pid = self.ask(&script, "__pid", COMMAND_DEADLINE, code);
        self.nodes
            .push((terminal, pid.parse().expect("a process id")));
    }

    /// Ctrl-C to the node in `terminal`, if one runs there; it must exit with status 0.
    fn stop_node(&mut self, terminal: u32) {
        let Some(at) = self.nodes.iter().position(|(t, _)| *t == terminal) else {
            return;
        };
        let (_, pid) = self.nodes.remove(at);
        let script = format!("kill -INT {pid}; wait {pid}; echo \"__stopped $?\"\n");
        let status = self.ask(
            &script,
            "__stopped",
            COMMAND_DEADLINE,
            &format!("Ctrl-C to the node in terminal {terminal}"),
        );
        assert_eq!(
            status,
            "0",
            "the node in terminal {terminal} exits cleanly after Ctrl-C\n{}",
            self.logs()
        );
    }

    /// Waits until every running node has logged that it is ready.
    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_DEADLINE;
        for (terminal, _) in &self.nodes {
            let log = self.log(*terminal);
            while !std::fs::read_to_string(&log).is_ok_and(|text| text.contains(READY)) {
                assert!(
                    Instant::now() < deadline,
                    "the node in terminal {terminal} never logged {READY:?} within {READY_DEADLINE:?}\n{}",
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn log(&self, terminal: u32) -> PathBuf {
        self.dir.join(format!("terminal-{terminal}.log"))
    }

    /// The running nodes' logs, for a failure's message.
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|(terminal, _)| {
                let text = std::fs::read_to_string(self.log(*terminal)).unwrap_or_default();
                format!("--- terminal {terminal} ---\n{text}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        for (_, pid) in &self.nodes {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The directory the README's commands run in: `scripts` is the repository's, and
/// `target/release/goutube` the binary these tests built.
fn workspace(dir: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::os::unix::fs::symlink(repo.join("scripts"), dir.join("scripts")).expect("scripts");
    std::fs::create_dir_all(dir.join("target/release")).expect("target/release");
    std::os::unix::fs::symlink(goutube_bin(), dir.join("target/release/goutube"))
        .expect("target/release/goutube");
    // A browser, for `xdg-open URL`: fetches the page and checks it is one.
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).expect("bin");
    let open = bin.join("xdg-open");
    std::fs::write(
        &open,
        "#!/bin/sh\ncurl -fsSL \"$1\" | grep -q '<html' || { echo \"not a page: $1\" >&2; exit 1; }\n",
    )
    .expect("xdg-open");
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    bin
}

#[test]
fn the_readme_runs_as_written() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(repo.join("README.md")).expect("README.md");
    let steps = steps(&readme);
    for section in [
        "Quick start",
        "With mTLS",
        "A leader and a follower",
        "A balancer in front",
        "A cluster of three primaries",
    ] {
        assert!(
            steps.iter().any(|s| s.section == section),
            "the README has commands under {section:?}"
        );
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let bin = workspace(dir.path());
    let mut shell = Shell::start(dir.path(), &bin);
    for step in &steps {
        let command = step.command.trim();
        if command == "scripts/test" || command.starts_with("scripts/test ") {
            continue;
        }
        if command.starts_with("scripts/node") {
            eprintln!("README, {}: {command} (in the background)", step.section);
            shell.start_node(command, terminal(command));
            continue;
        }
        shell.wait_ready();
        eprintln!("README, {}: {command}", step.section);
        let (status, output) = shell.run(&step.command);
        let where_ = format!("README, {}: `{}`", step.section, command);
        match &step.expect {
            Some(expected) => assert!(
                matches(&output, expected),
                "{where_} printed\n{output}\nnot {expected:?}\n{}",
                shell.logs()
            ),
            None => assert_eq!(status, 0, "{where_} failed:\n{output}\n{}", shell.logs()),
        }
    }
    let terminals: Vec<u32> = shell.nodes.iter().map(|(t, _)| *t).collect();
    for terminal in terminals {
        shell.stop_node(terminal);
    }
}

#[test]
fn blocks_split_into_the_commands_a_shell_reads() {
    let readme = "# Title\n\n```sh\na=1   # set\n# a comment\ncat > f <<'EOF'\nx\n# not a comment\nEOF\necho $a\n# -> 1\nfor i in 1 2; do cat > $i <<T\n$i\nT\ndone\n```\n\n## Other\n```\nnot sh\n```\n";
    let steps = steps(readme);
    let commands: Vec<&str> = steps.iter().map(|s| s.command.as_str()).collect();
    assert_eq!(
        commands,
        [
            "a=1   # set\n",
            "cat > f <<'EOF'\nx\n# not a comment\nEOF\n",
            "echo $a\n",
            "for i in 1 2; do cat > $i <<T\n$i\nT\ndone\n",
        ]
    );
    assert_eq!(steps[2].expect.as_deref(), Some("1"));
    assert!(steps.iter().all(|s| s.section == "Title"));
    assert!(matches("a b c", "a … c"));
    assert!(!matches("c b a", "a … c"));
    assert_eq!(terminal("scripts/node --config x   # terminal 3"), 3);
    assert_eq!(terminal("scripts/node # terminal 2, with the one above"), 2);
    assert_eq!(terminal("scripts/node"), 1);
}
