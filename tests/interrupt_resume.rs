//! Ctrl-C during `train` or `finetune` finishes the step, writes a checkpoint and exits;
//! `--resume` continues it to the same final train_loss, bit for bit, as a run that was never
//! interrupted. `kill -9` in the middle of writing a checkpoint leaves the previous one loadable.

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

/// Starts a run, sends SIGINT once it reports its first step, and checks it checkpointed.
fn interrupt(exe: &str, args: &[String]) {
    let mut child = Command::new(exe)
        .args(args)
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
}

fn text_file(dir: &std::path::Path) -> PathBuf {
    let data = dir.join("text.txt");
    let text: String = (0..20000)
        .map(|i| ["ab", "cd", "ef", "gh"][(i * 7 + i / 3) % 4])
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(&data, text).unwrap();
    data
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
    let data = text_file(&dir);
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
    interrupt(exe, &args(&s(data.clone()), &out));
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

fn run_ok(exe: &str, args: &[String]) -> std::process::Output {
    let out = Command::new(exe).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn finetune_sigint_then_resume_matches_an_uninterrupted_run() {
    let exe = env!("CARGO_BIN_EXE_tapelora");
    let dir = std::env::temp_dir().join(format!("tapelora-ft-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = text_file(&dir).display().to_string();
    let base = dir.join("base").display().to_string();
    let mut train = args(&data, &base);
    train[14] = "20".into(); // --steps
    run_ok(exe, &train);

    // LoRA with dropout (so the dropout RNG must resume too) and trainable biases; then --full.
    for (method, extra) in [
        (
            "lora",
            strings(&[
                "--dropout",
                "0.1",
                "--bias",
                "all",
                "--targets",
                "c_attn.q,c_attn.v,c_fc",
            ]),
        ),
        ("full", strings(&["--full"])),
    ] {
        let finetune = |out: &str| {
            let mut a = strings(&[
                "finetune",
                "--model",
                &base,
                "--data",
                &data,
                "--rank",
                "2",
                "--block",
                "16",
                "--batch",
                "4",
                "--steps",
                "3000",
                "--eval-every",
                "0",
                "--quiet",
                "--json",
                "--out",
                out,
            ]);
            a.extend(extra.iter().cloned());
            a
        };
        let whole_out = dir.join(format!("{method}-whole")).display().to_string();
        let whole = run_ok(exe, &finetune(&whole_out));
        let out = dir
            .join(format!("{method}-interrupted"))
            .display()
            .to_string();
        interrupt(exe, &finetune(&out));
        let state = PathBuf::from(&out).join("training_state.safetensors");
        assert!(state.exists(), "{method}: a checkpoint was written");
        if method == "lora" {
            assert!(PathBuf::from(&out)
                .join("adapter_state.safetensors")
                .exists());
            // The checkpoint is also a usable PEFT adapter folder.
            let inspect = run_ok(exe, &strings(&["inspect", &out]));
            assert!(!inspect.stdout.is_empty());
        }

        // Other options are refused, naming the option.
        let mut other = finetune(&out);
        other[6] = "4".into(); // --rank 4 instead of 2
        other.extend(strings(&["--resume", &out]));
        let refused = Command::new(exe).args(&other).output().unwrap();
        let msg = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{method}: {msg}");
        if method == "lora" {
            assert!(msg.contains("--rank"), "{msg}");
        }

        let mut resume = finetune(&out);
        resume.extend(strings(&["--resume", &out]));
        let resumed = run_ok(exe, &resume);
        assert_eq!(
            train_loss(&resumed.stdout),
            train_loss(&whole.stdout),
            "{method}: bit-identical final train_loss"
        );
        assert!(
            !state.exists(),
            "{method}: the final folder holds no training state"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `kill -9` at arbitrary moments of a run that checkpoints every step (so most of its time
/// is spent writing): each time, the checkpoint folder loads, and the last one resumes.
#[test]
fn kill_9_mid_save_leaves_the_previous_checkpoint_loadable() {
    use tapelora::gpt::hf::load_model;
    use tapelora::nn::TensorFile;
    let exe = env!("CARGO_BIN_EXE_tapelora");
    let dir = std::env::temp_dir().join(format!("tapelora-kill9-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = text_file(&dir).display().to_string();
    let out = dir.join("ckpt");
    let run_args = |resume: bool, every: bool| {
        let mut a = args(&data, &out.display().to_string());
        a[8] = "48".into(); // --embd: a few hundred KB per checkpoint
        if every {
            a.extend(strings(&["--checkpoint-every", "1"]));
        }
        if resume {
            a.extend(strings(&["--resume", &out.display().to_string()]));
        }
        a
    };
    let mut last_step = 0u64;
    for round in 0..8u64 {
        let mut child = Command::new(exe)
            .args(run_args(round > 0, true))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait for a first checkpoint of this round, then kill at a different moment each time.
        let started = std::time::Instant::now();
        while round == 0 && !out.join("training_state.safetensors").exists() {
            assert!(started.elapsed().as_secs() < 60, "no checkpoint appeared");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(150 + (round * 37) % 100));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let model = load_model(&out);
        assert!(model.is_ok(), "round {round}: {:?}", model.err());
        let state = TensorFile::open(&out.join("training_state.safetensors")).unwrap();
        let step: u64 = state.metadata()["next_step"].parse().unwrap();
        assert!(step >= last_step, "round {round}: the checkpoint went back");
        last_step = step;
        let leftovers: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".ckpt"))
            .collect();
        assert!(leftovers.is_empty(), "round {round}: debris {leftovers:?}");
    }
    assert!(last_step > 0);
    // The last checkpoint resumes to the end.
    let mut finish = run_args(true, false);
    finish[14] = (last_step + 5).to_string(); // --steps
    run_ok(exe, &finish);
    std::fs::remove_dir_all(&dir).unwrap();
}
