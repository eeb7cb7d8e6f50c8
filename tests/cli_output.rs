//! The client for scripts: `generate`, `watch` and `check` with `--json`
//! (one JSON object on stdout, progress on stderr), `--out DIR` (images
//! saved whole under safe names, all or nothing), and the exit codes
//! (0 succeeded, 1 the job failed, 2 usage, 3 a call or download failed),
//! run as a child process against an in-process server and simulator.

mod common;

use std::path::Path;

use common::{
    Harness, TOKEN,
    client::{
        client_args, files_in, image_host, one_json_object, png_size, run_client,
        run_client_with_umask, script_success, stderr_of,
    },
    process, unused_addr,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_wait_json_prints_the_final_job_and_nothing_else() {
    let h = Harness::start().await;
    let server = h.url();
    let output = run_client(&client_args(
        "generate",
        &server,
        TOKEN,
        &[
            "a magical landscape",
            "--wait",
            "--json",
            "--batch-size",
            "2",
            "--width",
            "128",
            "--height",
            "96",
            "--seed",
            "9896923949",
        ],
    ))
    .await;
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let job = one_json_object(&output.stdout);
    let mark_id = job["mark_id"].as_str().expect("mark_id").to_owned();
    assert_eq!(mark_id.len(), 32, "{job}");
    assert_eq!(job["state"], "SUCCEEDED");
    assert_eq!(job["upstream_status"], "success");
    assert_eq!(job["queue_position"], 0);
    assert_eq!(job["seed"], 9896923949_i64);
    assert!(
        job["prompt_id"].as_str().is_some_and(|p| !p.is_empty()),
        "{job}"
    );
    let images = job["images"].as_array().expect("images");
    assert_eq!(images.len(), 2, "{job}");
    for image in images {
        assert!(image["url"].as_str().is_some_and(|u| !u.is_empty()));
        assert!(image["name"].as_str().is_some_and(|n| !n.is_empty()));
        assert_eq!(
            (image["width"].clone(), image["height"].clone()),
            (json!(128), json!(96))
        );
        assert_eq!(image["nsfw"], false);
        assert!(image.get("path").is_none(), "no path without --out");
    }
    // The mark id and the progress went to stderr.
    assert!(stderr.contains(&format!("mark id: {mark_id}")), "{stderr}");
    assert!(stderr.contains("queue position"), "{stderr}");

    // `watch --json` of the finished job prints the same job, without seed.
    let watched = run_client(&client_args("watch", &server, TOKEN, &[&mark_id, "--json"])).await;
    assert_eq!(watched.status.code(), Some(0), "{}", stderr_of(&watched));
    let mut expected = job.clone();
    expected.as_object_mut().expect("object").remove("seed");
    assert_eq!(one_json_object(&watched.stdout), expected);

    let checked = run_client(&client_args("check", &server, TOKEN, &[&mark_id, "--json"])).await;
    assert_eq!(checked.status.code(), Some(0), "{}", stderr_of(&checked));
    assert_eq!(one_json_object(&checked.stdout), expected);

    // Without --wait, --json gives the mark id and seed at once.
    let started = run_client(&client_args(
        "generate",
        &server,
        TOKEN,
        &["p", "--json", "--seed", "5"],
    ))
    .await;
    assert_eq!(started.status.code(), Some(0), "{}", stderr_of(&started));
    let started = one_json_object(&started.stdout);
    assert_eq!(started["seed"], 5);
    assert_eq!(started["mark_id"].as_str().map(str::len), Some(32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_exits_1_and_still_prints_its_json() {
    let h = Harness::start().await;
    let server = h.url();
    let output = run_client(&client_args(
        "generate",
        &server,
        TOKEN,
        &["a castle [sim:fail]", "--wait", "--json"],
    ))
    .await;
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let job = one_json_object(&output.stdout);
    assert_eq!(job["state"], "FAILED");
    assert_eq!(job["upstream_status"], "failed");
    assert_eq!(job["images"], json!([]));
    assert!(stderr.contains("ended failed"), "{stderr}");
    let mark_id = job["mark_id"].as_str().expect("mark_id");

    // Plain `watch` and `check` of the failed job exit 1 too.
    for command in ["watch", "check"] {
        let output = run_client(&client_args(command, &server, TOKEN, &[mark_id])).await;
        assert_eq!(
            output.status.code(),
            Some(1),
            "{command}: {}",
            stderr_of(&output)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_exits_3_with_nothing_on_stdout() {
    let server = format!("http://{}", unused_addr());
    for args in [
        vec!["generate", "--server", &server, "p", "--wait", "--json"],
        vec!["watch", "--server", &server, "m", "--json"],
        vec!["check", "--server", &server, "m"],
    ] {
        let output = run_client(&args).await;
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
        assert!(stderr.contains("cannot connect to"), "{stderr}");
        assert!(stderr.contains("refused"), "the cause is shown: {stderr}");
    }
}

#[test]
fn usage_errors_exit_2_and_help_lists_the_exit_codes() {
    for args in [
        &["generate", "--bogus", "p"][..],
        &["generate", "p", "--out", "dir"],
        &["generate", "--server", "not a url", "p"],
        &["watch"],
        &["check", "--json"],
        &["check", "m", "--etag", "e"],
        &["check", "m", "--wait", "0s"],
    ] {
        let output = process::command(args).output().expect("run");
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr_of(&output)
        );
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    for args in [
        &["--help"][..],
        &["generate", "--help"],
        &["watch", "--help"],
        &["check", "--help"],
    ] {
        let output = process::command(args).output().expect("run");
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        let help = String::from_utf8_lossy(&output.stdout);
        for line in [
            "0  the job succeeded",
            "1  the job failed",
            "2  usage",
            "3  a call to the server, or an image download, failed",
        ] {
            assert!(help.contains(line), "{args:?} help lacks {line:?}:\n{help}");
        }
    }
    let help = process::command(&["watch", "--help"])
        .output()
        .expect("run")
        .stdout;
    let help = String::from_utf8_lossy(&help);
    assert!(
        help.contains("--json") && help.contains("--out <DIR>"),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_saves_the_simulators_images_decodable_at_the_jobs_size() {
    let h = Harness::start().await;
    let server = h.url();
    let scratch = tempfile::tempdir().expect("tempdir");
    // A directory that does not exist yet, two levels deep.
    let dir = scratch.path().join("new").join("images");
    let dir_text = dir.to_string_lossy().into_owned();
    let output = run_client(&client_args(
        "generate",
        &server,
        TOKEN,
        &[
            "a magical landscape",
            "--wait",
            "--json",
            "--batch-size",
            "2",
            "--width",
            "200",
            "--height",
            "120",
            "--out",
            &dir_text,
        ],
    ))
    .await;
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let job = one_json_object(&output.stdout);
    let images = job["images"].as_array().expect("images");
    assert_eq!(images.len(), 2, "{job}");
    let mut expected_files = Vec::new();
    for image in images {
        let name = image["name"].as_str().expect("name");
        let path = dir.join(name);
        assert_eq!(image["path"], path.to_string_lossy().as_ref(), "{job}");
        assert_eq!(png_size(&path), (200, 120), "{name}");
        assert!(
            stderr.contains(&format!("saved {}", path.display())),
            "{stderr}"
        );
        expected_files.push(name.to_owned());
    }
    expected_files.sort();
    assert_eq!(
        files_in(&dir),
        expected_files,
        "only the images, no temp file"
    );

    // Plain output with --out lists the saved files; `watch` saves the same.
    let mark_id = job["mark_id"].as_str().expect("mark_id");
    let again = scratch.path().join("again");
    let output = run_client(&client_args(
        "watch",
        &server,
        TOKEN,
        &[mark_id, "--out", &again.to_string_lossy()],
    ))
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    let listed: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = images
        .iter()
        .map(|i| {
            again
                .join(i["name"].as_str().expect("name"))
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(listed, expected);
    for path in &listed {
        assert_eq!(png_size(Path::new(path)), (200, 120));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_download_exits_3_and_leaves_no_file() {
    let h = Harness::start().await;
    let server = h.url();
    let host = image_host().await;
    let refused = format!("http://{}/x.png", unused_addr());
    let ok = format!("{host}/ok.png");
    let cut = format!("{host}/cut.png");
    let missing = format!("{host}/missing.png");
    let cases = [
        ("dl-404", missing.as_str(), "answered HTTP 404 Not Found"),
        ("dl-cut", cut.as_str(), "the connection broke after"),
        ("dl-refused", refused.as_str(), "cannot connect"),
    ];
    let scratch = tempfile::tempdir().expect("tempdir");
    for (token, bad_url, says) in cases {
        // The first image downloads fine; the second fails: all or nothing.
        let mark_id = format!("mark-{token}");
        script_success(
            &h,
            token,
            &mark_id,
            &[(&ok, "first.png"), (bad_url, "second.png")],
        )
        .await;
        let dir = scratch.path().join(token);
        let dir_text = dir.to_string_lossy().into_owned();
        let output = run_client(&client_args(
            "watch",
            &server,
            token,
            &[&mark_id, "--out", &dir_text, "--json"],
        ))
        .await;
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(3), "{token}: {stderr}");
        assert!(
            output.stdout.is_empty(),
            "{token}: no JSON after a failed download"
        );
        assert!(
            stderr.contains(says) && stderr.contains(bad_url),
            "{token}: {stderr}"
        );
        assert!(dir.is_dir(), "{token}: --out creates the directory");
        assert_eq!(
            files_in(&dir),
            Vec::<String>::new(),
            "{token}: no file left"
        );
    }

    // A file already in DIR is left alone by a failed download.
    let dir = scratch.path().join("kept");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("notes.txt"), "mine").expect("write");
    script_success(&h, "dl-keep", "mark-keep", &[(&cut, "x.png")]).await;
    let dir_text = dir.to_string_lossy().into_owned();
    let output = run_client(&client_args(
        "watch",
        &server,
        "dl-keep",
        &["mark-keep", "--out", &dir_text],
    ))
    .await;
    assert_eq!(output.status.code(), Some(3), "{}", stderr_of(&output));
    assert_eq!(files_in(&dir), ["notes.txt"]);

    // The same job's images from a working host: saved under safe names,
    // the paths in the JSON.
    script_success(
        &h,
        "dl-ok",
        "mark-ok",
        &[(&ok, "../escape.png"), (&ok, "../escape.png")],
    )
    .await;
    let dir = scratch.path().join("ok");
    let dir_text = dir.to_string_lossy().into_owned();
    let output = run_client(&client_args(
        "watch",
        &server,
        "dl-ok",
        &["mark-ok", "--out", &dir_text, "--json"],
    ))
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    assert_eq!(files_in(&dir), ["_escape-2.png", "_escape.png"]);
    let job = one_json_object(&output.stdout);
    assert_eq!(
        job["images"][0]["path"],
        dir.join("_escape.png").to_string_lossy().as_ref()
    );
    assert_eq!(
        job["images"][1]["path"],
        dir.join("_escape-2.png").to_string_lossy().as_ref()
    );
    assert_eq!(
        std::fs::read(dir.join("_escape.png")).expect("read"),
        vec![7u8; 2000]
    );
    assert!(
        files_in(scratch.path())
            .iter()
            .all(|n| !n.contains("escape")),
        "nothing outside DIR"
    );
}

/// Saved images get what a plain `File::create` gets under the caller's
/// umask (0666 less the mask), as `curl -o` or `cp` leave them, and a
/// failed download under the same mask still leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_saves_images_with_the_mode_of_the_callers_umask() {
    use std::os::unix::fs::PermissionsExt;

    let h = Harness::start().await;
    let server = h.url();
    let host = image_host().await;
    let ok = format!("{host}/ok.png");
    let cut = format!("{host}/cut.png");
    let scratch = tempfile::tempdir().expect("tempdir");
    for (umask, mode) in [("0022", 0o644), ("0077", 0o600), ("0002", 0o664)] {
        let token = format!("mode-{umask}");
        let mark_id = format!("mark-{umask}");
        script_success(&h, &token, &mark_id, &[(&ok, "a.png"), (&ok, "b.png")]).await;
        let dir = scratch.path().join(&token);
        let dir_text = dir.to_string_lossy().into_owned();
        let output = run_client_with_umask(
            umask,
            &client_args("watch", &server, &token, &[&mark_id, "--out", &dir_text]),
        )
        .await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
        let saved = files_in(&dir);
        assert_eq!(saved, ["a.png", "b.png"], "umask {umask}");
        for name in saved {
            let found = std::fs::metadata(dir.join(&name))
                .expect("saved image")
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(
                found, mode,
                "umask {umask}: {name} is {found:o}, not {mode:o}"
            );
        }

        let failed_token = format!("mode-cut-{umask}");
        let failed_mark = format!("mark-cut-{umask}");
        script_success(
            &h,
            &failed_token,
            &failed_mark,
            &[(&ok, "c.png"), (&cut, "d.png")],
        )
        .await;
        let dir = scratch.path().join(&failed_token);
        let dir_text = dir.to_string_lossy().into_owned();
        let output = run_client_with_umask(
            umask,
            &client_args(
                "watch",
                &server,
                &failed_token,
                &[&failed_mark, "--out", &dir_text],
            ),
        )
        .await;
        assert_eq!(output.status.code(), Some(3), "{}", stderr_of(&output));
        assert_eq!(
            files_in(&dir),
            Vec::<String>::new(),
            "umask {umask}: no file left"
        );
    }
}
