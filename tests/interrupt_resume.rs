//! Ctrl-C during `train` finishes the step, writes a checkpoint and exits; `--resume` continues
//! it to the same final train_loss, bit for bit, as a run that was never interrupted.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn args(data: &str, out: &str) -> Vec<String> {
    [
        "train",
        "--data",
        data,
        "--layers",
        "1",
        "--heads",
        "2",
        "--embd",
        "16",
        "--block",
        "16",
        "--batch",
        "4",
        "--steps",
        "4000",
        "--eval-every",
        "0",
        "--dropout",
        "0.1",
        "--quiet",
        "--json",
        "--out",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn train_loss(stdout: &[u8]) -> String {
    let text = String::from_utf8_lossy(stdout);
    let v: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a JSON line")).expect("JSON");
    v["train_loss"].to_string()
}

#[test]
fn sigint_then_resume_matches_an_uninterrupted_run() {
    let exe = env!("CARGO_BIN_EXE_tapelora");
    let dir = std::env::temp_dir().join(format!("tapelora-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("text.txt");
    let text: String = (0..20000)
        .map(|i| ["ab", "cd", "ef", "gh"][(i * 7 + i / 3) % 4])
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(&data, text).unwrap();
    let s = |p: PathBuf| p.display().to_string();

    let whole = Command::new(exe)
        .args(args(&s(data.clone()), &s(dir.join("whole"))))
        .output()
        .unwrap();
    assert!(
        whole.status.success(),
        "{}",
        String::from_utf8_lossy(&whole.stderr)
    );

    let out = s(dir.join("interrupted"));
    let mut child = Command::new(exe)
        .args(args(&s(data.clone()), &out))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "the run ended before it could be interrupted: {seen}"
        );
        seen += &line;
        if line.starts_with("step") {
            break;
        }
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(rest.contains("--resume"), "{rest}");
    assert!(dir.join("interrupted/training_state.safetensors").exists());

    let mut resume_args = args(&s(data.clone()), &out);
    resume_args.extend(["--resume".to_string(), out.clone()]);
    let resumed = Command::new(exe).args(&resume_args).output().unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(
        train_loss(&resumed.stdout),
        train_loss(&whole.stdout),
        "bit-identical final train_loss"
    );
    assert!(
        !dir.join("interrupted/training_state.safetensors").exists(),
        "the final folder is a plain model folder"
    );

    // A checkpoint from other options is refused.
    let mut other = args(&s(data), &s(dir.join("x")));
    other[4] = "2".into(); // --layers 2 instead of 1
    other.extend(["--resume".to_string(), out]);
    let refused = Command::new(exe).args(&other).output().unwrap();
    assert!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("differs")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
