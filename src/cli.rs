//! Small pieces the two binaries share: reading passwords, logging set-up, times, the exit
//! line, and the transfer progress bar. Colours and bars only on a terminal.

use anyhow::{Context, bail};
use std::path::Path;

/// Where a password comes from: `--password-file`, then `Q2Q_PASSWORD`, then a prompt on
/// the terminal (asked twice when `confirm`).
pub fn read_password(file: Option<&Path>, prompt: &str, confirm: bool) -> anyhow::Result<String> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read password file {}", f.display()))?;
        let pw = text.lines().next().unwrap_or("").to_string();
        if pw.is_empty() {
            bail!("password file {} is empty", f.display());
        }
        return Ok(pw);
    }
    if let Ok(pw) = std::env::var("Q2Q_PASSWORD") {
        if pw.is_empty() {
            bail!("Q2Q_PASSWORD is set but empty");
        }
        return Ok(pw);
    }
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        bail!(
            "no password given: use --password-file FILE or set Q2Q_PASSWORD (no terminal to ask on)"
        );
    }
    let pw = rpassword::prompt_password(prompt).context("cannot read the password")?;
    if confirm && rpassword::prompt_password("Again: ").context("cannot read the password")? != pw {
        bail!("the passwords do not match");
    }
    Ok(pw)
}

/// Log to stderr; `RUST_LOG` overrides `default` (e.g. "info" or "warn"). Colours only on
/// a terminal: a log file or a pipe gets plain text that grep can read.
pub fn init_logging(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM UTC`.
pub fn format_time(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute()
            )
        })
        .unwrap_or_else(|_| secs.to_string())
}

/// `println!` for a command's output: when the reader has gone (`q2q-server user list |
/// head -1`), the program ends quietly with success, as it would by SIGPIPE in a C program,
/// rather than panicking. Any other write error ends it with a one-line error.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::write_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_line(format_args!($($arg)*))
    };
}

/// Write one line of output to stdout (see [`outln!`](crate::outln)).
pub fn write_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written =
        out.write_fmt(args).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

/// The exit of a binary: success, or `error: …` (the whole chain, one line) and failure.
pub fn exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A progress bar on stderr for a file transfer (hidden when stderr is not a terminal):
/// `sending NAME [=====     ] 12 MiB/64 MiB 40 MiB/s 1s left`.
pub struct Bar(indicatif::ProgressBar);

impl Bar {
    /// A bar that starts its line with `verb` ("sending", "receiving").
    pub fn new(verb: &str) -> Bar {
        use std::io::IsTerminal;
        let target = if std::io::stderr().is_terminal() {
            indicatif::ProgressDrawTarget::stderr()
        } else {
            indicatif::ProgressDrawTarget::hidden()
        };
        let bar = indicatif::ProgressBar::with_draw_target(Some(0), target);
        let style = indicatif::ProgressStyle::with_template(&format!(
            "{verb} {{msg}} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} {{eta}} left"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        Bar(bar)
    }
}

impl crate::transfer::Progress for Bar {
    fn start(&mut self, total: u64) {
        self.0.set_length(total);
    }
    fn file(&mut self, name: &str) {
        self.0.set_message(name.to_string());
    }
    fn advance(&mut self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}
