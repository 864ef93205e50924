//! SIPp, a real SIP peer, sends OPTIONS to the server and checks the answer's headers
//! itself (tests/sipp/options_uac.xml fails a call whose 200 lacks any of them).

mod common;

use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_options_to_the_server() {
    let s = start_server().await;
    for (transport, addr) in [("u1", s.udp), ("t1", s.tcp)] {
        let dir = tempdir();
        let args: Vec<String> = vec![
            "-sf".into(),
            "tests/sipp/options_uac.xml".into(),
            "-i".into(),
            "127.0.0.1".into(),
            "-t".into(),
            transport.into(),
            "-m".into(),
            "20".into(),
            "-r".into(),
            "100".into(),
            "-timeout".into(),
            "20s".into(),
            "-trace_stat".into(),
            "-stf".into(),
            dir.join("stat.csv").display().to_string(),
            addr.to_string(),
        ];
        let out = run_sipp(&args, Duration::from_secs(30)).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "sipp over {transport} failed:\n{stdout}\n{stderr}"
        );
        // SIPp's own statistics: 20 successful calls, none failed.
        let stats = std::fs::read_to_string(dir.join("stat.csv")).expect("sipp stat file");
        let (head, last) = (stats.lines().next().unwrap(), stats.lines().last().unwrap());
        let col = |name: &str| {
            let i = head.split(';').position(|h| h == name).unwrap();
            last.split(';').nth(i).unwrap().parse::<u64>().unwrap()
        };
        assert_eq!(col("SuccessfulCall(C)"), 20, "{stats}");
        assert_eq!(col("FailedCall(C)"), 0, "{stats}");
    }
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(unique("strowger-sipp"));
    std::fs::create_dir_all(&d).unwrap();
    d
}
