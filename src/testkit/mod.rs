//! `strowger test`: the operator's dial-plan tests, written in Lua, run against the real
//! engine (transactions, dialogs, B2BUA, registrar, hunt groups, the configured script) on
//! the in-memory network, with simulated phones and trunks ([`crate::simulate`]), on a
//! paused tokio clock so that a 20 s ring takes no wall time.
//!
//! Owns: finding the test files, the test Lua API (`lua.rs`), one fresh server per test
//! (`world.rs`), the report (one line per test, a summary, JUnit XML). Must not touch: the
//! engine's internals: it configures and starts a server like `strowger run` does and talks
//! SIP to it through simulated devices.

mod lua;
mod world;

use crate::config::Config;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `strowger test` was asked to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Test files or folders of them (`*.lua`, recursively, in name order).
    pub paths: Vec<PathBuf>,
    /// The configuration the dial plan runs with (its `script.path` is the plan tested).
    pub config: Config,
    /// Where to write a JUnit XML report, if anywhere.
    pub junit: Option<PathBuf>,
}

/// One test's result.
#[derive(Debug, Clone)]
pub struct TestResult {
    pub file: String,
    pub name: String,
    /// `None`: passed; else why it failed, starting with `file:line:` where known.
    pub failure: Option<String>,
    /// What the failed test's calls looked like (the SIP ladder), for the report.
    pub ladder: String,
    pub wall: Duration,
    /// Time on the test's virtual clock.
    pub virtual_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error("{0}: no such file or folder")]
    Missing(String),
    #[error("{path}: {message}")]
    Load { path: String, message: String },
    #[error("{0}")]
    Runtime(String),
}

/// The test files under `paths`: files as given, folders searched for `*.lua`.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, TestError> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.extension().is_some_and(|e| e == "lua") {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut files).map_err(|e| TestError::Load {
                path: p.display().to_string(),
                message: e.to_string(),
            })?;
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            return Err(TestError::Missing(p.display().to_string()));
        }
    }
    Ok(files)
}

/// Runs every test of `opts`, writing a line per test and a summary to `out`. Runs on a
/// runtime of its own (one thread, paused clock); call it off any runtime.
pub fn run(opts: &Options, out: &mut dyn Write) -> Result<Vec<TestResult>, TestError> {
    let files = discover(&opts.paths)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| TestError::Runtime(e.to_string()))?;
    let local = tokio::task::LocalSet::new();
    let started = Instant::now();
    let results = local.block_on(&rt, async {
        crate::script::run_vms_inline();
        crate::storage::hold_clock_while_storing();
        let mut results = Vec::new();
        for file in &files {
            let r = lua::run_file(file, &opts.config, out).await?;
            results.extend(r);
        }
        Ok::<_, TestError>(results)
    })?;
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    let _ = writeln!(
        out,
        "\n{} passed, {} failed ({} files, {} ms)",
        results.len() - failed,
        failed,
        files.len(),
        started.elapsed().as_millis()
    );
    if let Some(path) = &opts.junit {
        std::fs::write(path, junit(&results)).map_err(|e| TestError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    }
    Ok(results)
}

/// `strowger route-test`: one simulated call through the configured dial plan; every
/// target it dials answers as `target` says (`{}`: at once; `{"busy": true}`,
/// `{"ring": true}`, `{"reject": 503}`, `{"answer_after": 3}`). Returns the decisions:
/// targets dialled in order with their answers, the caller's final answer, the record's
/// route, and the ladder.
pub fn route_test(
    config: &Config,
    from: &str,
    to: &str,
    headers: &[(String, String)],
    target: &serde_json::Value,
) -> Result<String, TestError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| TestError::Runtime(e.to_string()))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        crate::script::run_vms_inline();
        crate::storage::hold_clock_while_storing();
        world::route(config, from, to, headers, target)
            .await
            .map_err(TestError::Runtime)
    })
}

/// One report line for a result (and the failure's detail under it).
pub(crate) fn report_line(r: &TestResult) -> String {
    match &r.failure {
        None => format!(
            "ok    {} :: {} ({} ms, {:.1} s simulated)",
            r.file,
            r.name,
            r.wall.as_millis(),
            r.virtual_time.as_secs_f64()
        ),
        Some(why) => {
            let mut s = format!("FAIL  {} :: {}\n      {why}", r.file, r.name);
            if !r.ladder.is_empty() {
                s.push_str("\n      the calls:\n");
                for line in r.ladder.lines() {
                    s.push_str("        ");
                    s.push_str(line);
                    s.push('\n');
                }
            }
            s
        }
    }
}

/// The results as JUnit XML (one testsuite per file), as CI systems read it.
pub fn junit(results: &[TestResult]) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let mut files: Vec<&str> = results.iter().map(|r| r.file.as_str()).collect();
    files.dedup();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n");
    for file in files {
        let of: Vec<&TestResult> = results.iter().filter(|r| r.file == file).collect();
        let failures = of.iter().filter(|r| r.failure.is_some()).count();
        let time: f64 = of.iter().map(|r| r.wall.as_secs_f64()).sum();
        x.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" time=\"{time:.3}\">\n",
            esc(file),
            of.len()
        ));
        for r in of {
            x.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                esc(file),
                esc(&r.name),
                r.wall.as_secs_f64()
            ));
            match &r.failure {
                None => x.push_str("/>\n"),
                Some(why) => x.push_str(&format!(
                    ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                    esc(why),
                    esc(&format!("{why}\n{}", r.ladder))
                )),
            }
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_escapes_and_counts() {
        let r = |name: &str, failure: Option<&str>| TestResult {
            file: "t.lua".into(),
            name: name.into(),
            failure: failure.map(str::to_owned),
            ladder: String::new(),
            wall: Duration::from_millis(5),
            virtual_time: Duration::ZERO,
        };
        let x = junit(&[
            r("a", None),
            r("b <&>", Some("t.lua:3: expected 200, got 486")),
        ]);
        assert!(x.contains("tests=\"2\" failures=\"1\""), "{x}");
        assert!(x.contains("name=\"b &lt;&amp;&gt;\""), "{x}");
        assert!(
            x.contains("<failure message=\"t.lua:3: expected 200, got 486\">"),
            "{x}"
        );
    }
}
