//! The `strowger` binary: parses the command line, loads the configuration, sets up
//! logging and a tokio runtime, and hands over to the server.
//!
//! Owns: exit codes. 0 = clean shutdown or valid configuration; 1 = runtime error (the
//! error chain is printed) or an unimplemented command; 2 = bad configuration or bad
//! command line (clap's own code for usage errors). Must not touch: anything the server
//! does once it runs.

mod cli;

// mimalloc instead of glibc malloc (why: src/allocator.rs).
#[global_allocator]
static GLOBAL: strowger::allocator::Allocator = strowger::allocator::Allocator;

use clap::Parser as _;
use cli::{Cli, Command};
use std::path::Path;
use std::process::ExitCode;
use strowger::config::Config;

/// Bad configuration: a script or supervisor can tell it from a crash.
const EXIT_CONFIG: u8 = 2;
/// The server failed while running, or the command cannot do its job.
const EXIT_RUNTIME: u8 = 1;

/// Turns transparent huge pages off for this process. The allocator asks for them
/// (MADV_HUGEPAGE) and gives idle pages back after a second; under a flood every page it
/// touches again is a fresh 2 MiB the kernel zeroes first: with them on, 29% of the
/// server's CPU at 3x overload went to clearing pages and goodput fell to 45% of the
/// offered rate, against 124% of the base rate with them off (`PIN=1 BASE=2000 MULTS=3
/// bash benches/overload.sh`). Redis and most databases ask the same for the same reason.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers and touches no memory
        // of ours; it sets a flag on the process's address space.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "PR_SET_THP_DISABLE failed");
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args.config.as_deref()),
        Command::Check(args) => check(args.config.as_deref()),
        Command::Reload(args) => reload(args.config.as_deref()),
        Command::Registrations(args) => registrations(args.config.config.as_deref(), args.json),
        Command::Trunks(args) => trunks(args.config.config.as_deref(), args.json),
        Command::Drain(args) => drain(args.config.as_deref()),
        Command::Test(args) => dial_plan_tests(args),
        Command::RouteTest(args) => route_test(args),
    }
}

/// `strowger route-test`: one simulated call; 0 when it ran (whatever its answer), 2 when
/// it could not.
fn route_test(args: cli::RouteTestArgs) -> ExitCode {
    let config = match Config::load(args.config.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut headers = Vec::new();
    for h in &args.headers {
        match h.split_once(':') {
            Some((name, value)) if !name.trim().is_empty() => {
                headers.push((name.trim().to_string(), value.trim().to_string()))
            }
            _ => {
                eprintln!("--header {h:?}: expected \"Name: value\"");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let mut target = serde_json::Map::new();
    if let Some(s) = args.answer_after {
        target.insert("answer_after".into(), s.into());
    }
    if args.busy {
        target.insert("busy".into(), true.into());
    }
    if let Some(s) = args.reject {
        target.insert("reject".into(), s.into());
    }
    if args.no_answer {
        target.insert("ring".into(), true.into());
    }
    match strowger::testkit::route_test(
        &config,
        &args.from,
        &args.to,
        &headers,
        &serde_json::Value::Object(target),
    ) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("strowger route-test: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `strowger test`: the dial-plan tests; 0 all passed, 1 one failed, 2 they could not run.
fn dial_plan_tests(args: cli::TestArgs) -> ExitCode {
    let config = match Config::load(args.config.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let opts = strowger::testkit::Options {
        paths: args.paths,
        config,
        junit: args.junit,
    };
    let mut out = std::io::stdout();
    match strowger::testkit::run(&opts, &mut out) {
        Ok(results) if results.iter().all(|r| r.failure.is_none()) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("strowger test: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `strowger check`: validates without starting anything.
fn check(path: Option<&Path>) -> ExitCode {
    let (config, source) = match Config::load_with_source(path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The script is part of the configuration: one that does not compile is refused with
    // its file and line. Its top-level code runs under the configured limits, so a script
    // that would hang the server's start-up makes `check` fail instead of hang.
    let hooks = match strowger::script::ScriptEngine::check(&script_options(&config)) {
        Ok(hooks) => hooks,
        Err(e) => {
            eprintln!("script error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for warning in hooks.warnings() {
        eprintln!("warning: {warning}");
    }
    // The certificate and key files, as the server would read them at start.
    let tls = tls_files(&config);
    for warning in &tls.warnings {
        eprintln!("warning: {warning}");
    }
    if !tls.problems.is_empty() {
        for problem in &tls.problems {
            eprintln!("TLS error: {problem}");
        }
        return ExitCode::from(EXIT_CONFIG);
    }
    println!("configuration OK: {source}");
    println!("script OK: {}", config.script.path);
    for line in &tls.good {
        println!("{line}");
    }
    ExitCode::SUCCESS
}

/// What [`tls_files`] found.
#[derive(Default)]
struct TlsReport {
    /// One line per good certificate or CA bundle.
    good: Vec<String>,
    /// Certificates that expire soon.
    warnings: Vec<String>,
    /// `KEY: FILE: PROBLEM`, one per file set that would stop the start.
    problems: Vec<String>,
}

/// The TLS files of the configuration (`tls.cert`/`tls.key`, `tls.ca`, each trunk's
/// `tls_cert`/`tls_key`) checked as the server checks them at start, all of them rather
/// than the first failure, so one `check` shows everything to fix.
fn tls_files(config: &Config) -> TlsReport {
    use strowger::transport::tls::{check_ca, check_files, utc, EXPIRY_WARNING};
    let mut report = TlsReport::default();
    let now = std::time::SystemTime::now();
    let mut pair = |what: String, cert: &Path, key: &Path| match check_files(cert, key) {
        Ok(summary) => {
            let left = summary.expires_in(now);
            if left < EXPIRY_WARNING {
                report.warnings.push(format!(
                    "{what}: {}: expires in {} days ({})",
                    cert.display(),
                    left.as_secs() / 86_400,
                    utc(summary.not_after)
                ));
            }
            report
                .good
                .push(format!("{what} OK: {}: {summary}", cert.display()));
        }
        Err(e) => report.problems.push(format!("{what}: {e}")),
    };
    if config.tls.has_cert() {
        let files = config.tls.files();
        pair("tls.cert".into(), &files.cert, &files.key);
    }
    for (name, trunk) in &config.trunks {
        if let Some((_, id)) = trunk.tls_identity() {
            pair(format!("trunks.{name}.tls_cert"), &id.cert, &id.key);
        }
    }
    if let Some(ca) = config.tls.files().ca {
        match check_ca(&ca) {
            Ok(n) => report
                .good
                .push(format!("tls.ca OK: {}: {n} CA certificates", ca.display())),
            Err(e) => report.problems.push(format!("tls.ca: {e}")),
        }
    }
    report
}

/// The script engine's options from the `[script]` section.
fn script_options(config: &Config) -> strowger::script::EngineOptions {
    let mut opts = strowger::script::EngineOptions::new(&config.script.path);
    opts.memory_limit = config.script.memory_limit_kb.saturating_mul(1024);
    opts.instruction_limit = config.script.instruction_limit;
    opts.time_limit = std::time::Duration::from_millis(config.script.time_limit_ms);
    opts.routes = config.call.routes.clone();
    opts
}

/// `strowger registrations`: the running server's bindings, as a table (or its JSON).
fn registrations(path: Option<&Path>, as_json: bool) -> ExitCode {
    admin_list(path, as_json, "/registrations", registrations_table)
}

/// `strowger trunks`: the running server's trunks, as a table (or its JSON).
fn trunks(path: Option<&Path>, as_json: bool) -> ExitCode {
    admin_list(path, as_json, "/trunks", trunks_table)
}

/// GETs a list from the running server's admin API and prints it as JSON or as the table
/// `table` makes of it.
fn admin_list<T: serde::de::DeserializeOwned>(
    path: Option<&Path>,
    as_json: bool,
    what: &'static str,
    table: fn(&[T]) -> String,
) -> ExitCode {
    let client = match admin_client(path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match client.block_on(strowger::admin::request_list(
        client.addr,
        what,
        &client.token,
    )) {
        Ok(text) if as_json => write_out(&format!("{text}\n")),
        Ok(text) => match serde_json::from_str::<Vec<T>>(&text) {
            Ok(list) => write_out(&table(&list)),
            Err(e) => {
                eprintln!("error: unexpected answer from the server: {e}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// One line per binding: AOR, contact, q, seconds left, source, user agent.
fn registrations_table(list: &[strowger::registrar::Binding]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut out = format!(
        "{:<32} {:<44} {:>4} {:>8} {:<26} {}\n",
        "AOR", "CONTACT", "Q", "EXPIRES", "SOURCE", "USER-AGENT"
    );
    for b in list {
        out.push_str(&format!(
            "{:<32} {:<44} {:>4.2} {:>7}s {:<26} {}\n",
            b.aor,
            b.contact,
            b.q,
            b.expires_at.saturating_sub(now),
            b.source,
            b.user_agent.as_deref().unwrap_or("-")
        ));
    }
    out.push_str(&format!("{} binding(s)\n", list.len()));
    out
}

/// One line per trunk: name, up, registration (seconds left, or the next retry and the
/// last status), channels, calls answered/failed/refused, URI.
fn trunks_table(list: &[strowger::trunk::TrunkView]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut out = format!(
        "{:<20} {:<5} {:<26} {:>9} {:>20} {}\n",
        "TRUNK", "UP", "REGISTRATION", "CHANNELS", "ANS/FAIL/REFUSED", "URI"
    );
    for t in list {
        let r = &t.registration;
        let status = r.last_status.map_or("-".to_string(), |s| s.to_string());
        let registration = if !t.register {
            "-".to_string()
        } else if t.registered {
            let left = r.expires_at.map_or(0, |e| e.saturating_sub(now));
            format!("yes ({left}s left)")
        } else if let Some(at) = r.next_retry {
            format!("no ({status}, retry {}s)", at.saturating_sub(now))
        } else {
            format!("no ({status})")
        };
        let max = if t.max_channels == 0 {
            "-".to_string()
        } else {
            t.max_channels.to_string()
        };
        out.push_str(&format!(
            "{:<20} {:<5} {:<26} {:>9} {:>20} {}\n",
            t.name,
            if t.up { "yes" } else { "no" },
            registration,
            format!("{}/{max}", t.channels),
            format!(
                "{}/{}/{}",
                t.calls.answered, t.calls.failed, t.calls.refused
            ),
            t.uri
        ));
    }
    out.push_str(&format!("{} trunk(s)\n", list.len()));
    out
}

/// How to reach the admin endpoint: its address and token from the configuration, and a
/// runtime.
struct AdminClient {
    addr: std::net::SocketAddr,
    /// `http.token`; empty = none sent.
    token: String,
    runtime: tokio::runtime::Runtime,
}

impl AdminClient {
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

/// The admin endpoint's address and token from the configuration, and a runtime to reach
/// it.
fn admin_client(path: Option<&Path>) -> Result<AdminClient, ExitCode> {
    let config = Config::load(path).map_err(|e| {
        eprintln!("configuration error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    let addr = config.http.listen.parse().map_err(|e| {
        eprintln!(
            "configuration error: http.listen {:?}: {e}",
            config.http.listen
        );
        ExitCode::from(EXIT_CONFIG)
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_RUNTIME)
        })?;
    Ok(AdminClient {
        addr,
        token: config.http.token,
        runtime,
    })
}

/// Prints a 2xx answer of the admin endpoint (exit 0), or the error with the server's
/// answer (exit 1).
fn print_answer(answer: anyhow::Result<String>) -> ExitCode {
    match answer {
        Ok(answer) => write_out(&format!("{answer}\n")),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Writes a command's output. A reader that closed the pipe early (`| head`) has all it
/// wanted: that is success, not a panic (what `println!` does on EPIPE).
fn write_out(text: &str) -> ExitCode {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the output: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// `strowger reload`: asks the running server (at the configuration's `http.listen`) to
/// reload its script; the same as sending it SIGHUP.
fn reload(path: Option<&Path>) -> ExitCode {
    match admin_client(path) {
        Ok(c) => print_answer(c.block_on(strowger::admin::request_reload(c.addr, &c.token))),
        Err(code) => code,
    }
}

/// `strowger drain`: the running server stops taking new calls; the rest finish.
fn drain(path: Option<&Path>) -> ExitCode {
    match admin_client(path) {
        Ok(c) => print_answer(c.block_on(strowger::admin::request_drain(c.addr, &c.token))),
        Err(code) => code,
    }
}

/// `strowger run`: the server, until a signal stops it.
fn run(path: Option<&Path>) -> ExitCode {
    let (config, source) = match Config::load_with_source(path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Logging fails only on a bad RUST_LOG, which is configuration too.
    if let Err(e) = strowger::logging::init(&config.log) {
        eprintln!("configuration error: {e:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // Certificate files are configuration too: every problem, exit code 2, before anything
    // binds (the server's start would stop at the first one).
    let tls = tls_files(&config);
    if !tls.problems.is_empty() {
        for problem in &tls.problems {
            eprintln!("configuration error: {problem}");
        }
        return ExitCode::from(EXIT_CONFIG);
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %source,
        "strowger starting"
    );
    raise_descriptor_limit(
        (config.sip.tcp_max_connections + config.http.max_connections + 256) as u64,
    );
    no_transparent_huge_pages();
    // `script.vm_threads = false` (the default with one SIP worker): one thread carries
    // SIP, HTTP and the Lua VMs (a current-thread runtime running a LocalSet, where the VMs
    // are local tasks); else a multi-thread runtime with `sip.workers` workers and the VMs
    // on threads of their own.
    let vm_threads = config.script.vm_threads(config.sip.workers);
    let hold_sends = !vm_threads || config.sip.workers == 1;
    let mut builder = if vm_threads {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder
        .enable_all()
        .thread_name("strowger-worker")
        // A SIP worker holds the responses and ACKs it sends while it has work and sends
        // them in one system call when it runs out (src/transport/udp.rs, `outbox`). Only
        // worker threads park, so only they hold (from their first park on). With more
        // than one worker, a call's messages may be made on different threads, and one
        // thread's outbox could leave before another's that holds an earlier message of
        // the same call (a 180 after its 200: SIPp failed 1-3 calls in 1,000): then
        // nothing is held.
        .on_thread_park(move || {
            strowger::transport::outbox::flush();
            if hold_sends {
                strowger::transport::outbox::hold_on_this_thread();
            }
        })
        .on_thread_stop(strowger::transport::outbox::flush);
    // `sip.workers` (0 = tokio's default, one per core).
    if config.sip.workers > 0 && vm_threads {
        builder.worker_threads(config.sip.workers);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let result = if vm_threads {
        runtime.block_on(serve(config))
    } else {
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            strowger::script::run_vms_inline();
            serve(config).await
        })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain: "binding sip.listen: cannot bind ...: Address already in use".
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// An error and its causes joined by ": ", each said once: some errors already show their
/// source in their own text, and `{:#}` would then print it twice.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Runs the server to completion.
async fn serve(config: Config) -> anyhow::Result<()> {
    // What the allocator could give back goes back every few seconds, also while no
    // traffic comes to prompt it (`allocator::give_back`); for the process, so here.
    tokio::spawn(async {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tick.tick().await;
            strowger::allocator::give_back();
        }
    });
    strowger::server::run(config).await
}

/// Issue 15: with the usual soft limit of 1,024 descriptors, about a thousand TCP
/// connections exhausted the process and every accept failed. The soft limit is raised to
/// the hard one (what Kamailio and FreeSWITCH ask operators to do by hand), and a warning
/// says when even that is below what the connection bounds may need.
fn raise_descriptor_limit(wanted: u64) {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
            return;
        };
        let mut now = soft;
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            now = hard;
        }
        if now < wanted {
            tracing::warn!(
                limit = now,
                wanted,
                "the descriptor limit (ulimit -n) is below sip.tcp_max_connections + http.max_connections: raise it, or lower them"
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = wanted;
}
