//! The client's display on a terminal, seen through a pseudo-terminal: a
//! spinner redrawn in place and a download bar on stderr, while a piped
//! stdout still gets clean JSON.

mod common;

use std::{
    io::Read,
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use common::{
    Harness, TOKEN,
    client::{client_args, image_host, one_json_object, png_size, script_success},
    process,
};

/// A pseudo-terminal of 40 rows and 120 columns.
struct Pty {
    master: std::fs::File,
    terminal: std::fs::File,
}

fn open_pty() -> Pty {
    use rustix::{
        fs::{Mode, OFlags},
        pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt},
        termios::{Winsize, tcsetwinsize},
    };
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .expect("open a pseudo-terminal");
    grantpt(&master).expect("grantpt");
    unlockpt(&master).expect("unlockpt");
    let name = ptsname(&master, Vec::new()).expect("ptsname");
    let terminal = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .expect("open the terminal side");
    let size = Winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    tcsetwinsize(&terminal, size).expect("set the window size");
    Pty {
        master: master.into(),
        terminal: terminal.into(),
    }
}

/// [`run_on_terminal`] off the runtime, which keeps serving the in-process
/// server and simulator meanwhile.
async fn on_terminal(args: &[&str], stdout_on_terminal: bool) -> (ExitStatus, Vec<u8>, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_on_terminal(&args, stdout_on_terminal)
    })
    .await
    .expect("join")
}

/// Runs the client with stderr on a terminal (stdout too when
/// `stdout_on_terminal`, else piped) and returns how it exited, its piped
/// stdout, and everything the terminal received.
fn run_on_terminal(args: &[&str], stdout_on_terminal: bool) -> (ExitStatus, Vec<u8>, String) {
    let pty = open_pty();
    let mut master = pty.master;
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Ends with EIO (Linux) or EOF once the last terminal-side fd closes.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    });
    let mut command = process::command(args);
    command
        .env("TERM", "xterm-256color")
        .stdin(Stdio::null())
        .stderr(pty.terminal.try_clone().expect("dup"));
    if stdout_on_terminal {
        command.stdout(pty.terminal);
    } else {
        command.stdout(Stdio::piped());
        drop(pty.terminal);
    }
    let mut child = command.spawn().expect("spawn on the terminal");
    drop(command);
    let mut stdout = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_end(&mut stdout).expect("read stdout");
    }
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the client did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let seen = reader.join().expect("terminal reader");
    (status, stdout, String::from_utf8_lossy(&seen).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_gets_live_progress_while_stdout_stays_clean_json() {
    let h = Harness::start().await;
    let server = h.url();
    let scratch = tempfile::tempdir().expect("tempdir");
    let dir = scratch.path().join("images");
    let (status, stdout, screen) = on_terminal(
        &client_args(
            "generate",
            &server,
            TOKEN,
            &[
                "a magical landscape",
                "--wait",
                "--json",
                "--width",
                "160",
                "--height",
                "120",
                "--out",
                &dir.to_string_lossy(),
            ],
        ),
        false,
    )
    .await;
    assert!(status.success(), "{screen}");
    let job = one_json_object(&stdout);
    assert_eq!(job["state"], "SUCCEEDED");
    let name = job["images"][0]["name"].as_str().expect("name").to_owned();
    // The spinner redraws one line in place (carriage return, clear line)
    // instead of printing a line per change.
    assert!(screen.contains("pending, queue position"), "{screen:?}");
    assert!(
        screen.contains("\r\u{1b}[2K"),
        "no in-place redraw: {screen:?}"
    );
    assert!(
        !screen.contains("succeeded, 1 image(s)\r\n"),
        "the terminal got plain lines: {screen:?}"
    );
    // The download drew its bar, then said where the image went.
    assert!(
        screen.contains(&format!("{name} [")),
        "no download bar: {screen:?}"
    );
    let saved = dir.join(&name);
    assert!(
        screen.contains(&format!("saved {}", saved.display())),
        "{screen:?}"
    );
    assert!(
        !screen.contains("\"mark_id\""),
        "JSON leaked to the terminal"
    );
    assert_eq!(png_size(&saved), (160, 120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_shows_a_download_bar_for_out() {
    let h = Harness::start().await;
    let server = h.url();
    let host = image_host().await;
    let slow = format!("{host}/slow.png");
    script_success(&h, "tty", "mark-tty", &[(&slow, "slow.png")]).await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let dir = scratch.path().join("images");
    let (status, _, screen) = on_terminal(
        &client_args(
            "watch",
            &server,
            "tty",
            &["mark-tty", "--out", &dir.to_string_lossy()],
        ),
        true,
    )
    .await;
    assert!(status.success(), "{screen}");
    // The bar names the file and counts bytes against the total.
    assert!(screen.contains("slow.png ["), "no download bar: {screen:?}");
    assert!(screen.contains("/64.00 KiB"), "no byte count: {screen:?}");
    let saved = dir.join("slow.png");
    assert!(
        screen.contains(&format!("saved {}", saved.display())),
        "{screen:?}"
    );
    assert!(
        screen.contains(&format!("{}\r\n", saved.display())),
        "the path on stdout: {screen:?}"
    );
    assert_eq!(std::fs::metadata(&saved).expect("saved").len(), 64 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_gets_one_live_line_per_job_of_a_watch_of_several() {
    let h = Harness::start().await;
    let server = h.url();
    let mut client = h.client().await;
    let a = common::start_job(&mut client, TOKEN, "a harbour").await;
    let b = common::start_job(&mut client, TOKEN, "a lighthouse").await;
    let (status, stdout, screen) =
        on_terminal(&client_args("watch", &server, TOKEN, &[&a, &b]), false).await;
    assert!(status.success(), "{screen}");
    // Each job has its own line, redrawn in place.
    for id in [&a, &b] {
        assert!(screen.contains(&format!("{id}: ")), "{screen:?}");
    }
    assert!(
        screen.contains("\u{1b}[2K"),
        "no in-place redraw: {screen:?}"
    );
    let stdout = String::from_utf8_lossy(&stdout);
    assert!(stdout.starts_with(&format!("{a}: succeeded")), "{stdout}");
    assert!(stdout.contains(&format!("\n{b}: succeeded")), "{stdout}");
}
