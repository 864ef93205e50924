//! The command line: `strowger run|check|reload|registrations|trunks|drain|test [--config
//! PATH]` and `--version`.
//!
//! Owns: argument names, help texts and their defaults. Must not touch: what the commands
//! do (that is `main.rs`) or configuration loading (that is `strowger::config`).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Programmable SIP call-control server (B2BUA) with Lua dial plans.
#[derive(Parser, Debug)]
#[command(name = "strowger", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server until SIGTERM or SIGINT, then drain and stop.
    Run(ConfigArgs),
    /// Load and validate the configuration, then exit: 0 if it is valid, 2 if not.
    Check(ConfigArgs),
    /// Ask the running server (at the configuration's http.listen) to reload its Lua script;
    /// calls in progress keep the version they started with. Same as SIGHUP.
    Reload(ConfigArgs),
    /// List the running server's registrations (contact, expiry, user agent, source).
    Registrations(RegistrationsArgs),
    /// List the running server's trunks: up (pings), registered, channels in use,
    /// registration expiry or next retry, calls by outcome.
    Trunks(TrunksArgs),
    /// Ask the running server to stop taking new calls and registrations (they get 503)
    /// while the ones in progress finish; prints its JSON answer. The process keeps
    /// running: stop it with SIGTERM.
    Drain(ConfigArgs),
    /// Run dial-plan tests (Lua files) against the configured script in the real engine,
    /// in memory, with simulated phones and trunks and a virtual clock. Exit 0 when all
    /// pass, 1 when one fails, 2 when they cannot run.
    Test(TestArgs),
    /// One simulated call through the configured dial plan, in memory, where every target
    /// it dials answers (or as the flags say): prints the targets dialled in order, their
    /// answers, the caller's final answer and the ladder. "Why did this call go there?"
    RouteTest(RouteTestArgs),
}

#[derive(Args, Debug)]
pub struct RouteTestArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The caller, e.g. sip:1000@example.com.
    #[arg(long, value_name = "URI")]
    pub from: String,
    /// The number or URI called, e.g. 9+15551234.
    #[arg(long, value_name = "NUMBER|URI")]
    pub to: String,
    /// A header of the INVITE, "Name: value" (repeat for more).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// The targets answer after this many seconds (virtual time) [default: at once].
    #[arg(long, value_name = "SECONDS")]
    pub answer_after: Option<f64>,
    /// The targets answer 486 Busy Here.
    #[arg(long, conflicts_with_all = ["reject", "no_answer"])]
    pub busy: bool,
    /// The targets answer with this final status (e.g. 503).
    #[arg(long, value_name = "STATUS")]
    pub reject: Option<u16>,
    /// The targets ring and never answer.
    #[arg(long, conflicts_with = "reject")]
    pub no_answer: bool,
}

#[derive(Args, Debug)]
pub struct TestArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Test files or folders of them (every `*.lua` inside, in name order).
    #[arg(value_name = "PATH", default_value = "scripts/tests")]
    pub paths: Vec<PathBuf>,
    /// Also write a JUnit XML report there (for CI systems).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RegistrationsArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TrunksArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// Configuration file [default: config/strowger.toml, or the built-in copy of it when
    /// that file does not exist]. A file given here must exist. STROWGER_<SECTION>__<KEY>
    /// environment variables override its values.
    // An Option rather than a clap default: a missing default file falls back to the
    // built-in copy, while a missing file the operator named is an error.
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_commands() {
        let cli = Cli::try_parse_from(["strowger", "check", "--config", "x.toml"]).unwrap();
        match cli.command {
            Command::Check(a) => assert_eq!(a.config, Some(PathBuf::from("x.toml"))),
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from(["strowger", "run"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Run(ConfigArgs { config: None })
        ));
        let cli = Cli::try_parse_from(["strowger", "drain", "-c", "y.toml"]).unwrap();
        match cli.command {
            Command::Drain(a) => assert_eq!(a.config, Some(PathBuf::from("y.toml"))),
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from(["strowger", "trunks", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Trunks(TrunksArgs { json: true, .. })
        ));
        assert!(Cli::try_parse_from(["strowger"]).is_err());
    }
}
