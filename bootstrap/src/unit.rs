//! The systemd unit subset hiveseed renders, parsed strictly: the supervisor runs exactly what
//! systemd would, and a key we do not implement is an error naming it instead of a silent
//! difference between the two executors.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hiveseed_proto::AbsPath;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("line {line}: unknown section [{section}]")]
    UnknownSection { line: usize, section: String },
    #[error("line {line}: unknown key {key}= in [{section}]")]
    UnknownKey {
        line: usize,
        section: String,
        key: String,
    },
    #[error("line {line}: {key}={value:?}: {reason}")]
    Invalid {
        line: usize,
        key: String,
        value: String,
        reason: String,
    },
    #[error("line {line}: {reason}")]
    Syntax { line: usize, reason: &'static str },
    #[error("[Service] has no ExecStart=")]
    MissingExecStart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    No,
    OnFailure,
    Always,
}

/// Signals a unit may name in `KillSignal=` / `RestartPreventExitStatus=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillSignal {
    Hup,
    Int,
    Quit,
    Kill,
    Usr1,
    Usr2,
    Term,
}

impl KillSignal {
    pub fn number(self) -> i32 {
        match self {
            KillSignal::Hup => 1,
            KillSignal::Int => 2,
            KillSignal::Quit => 3,
            KillSignal::Kill => 9,
            KillSignal::Usr1 => 10,
            KillSignal::Usr2 => 12,
            KillSignal::Term => 15,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        let name = s.strip_prefix("SIG").unwrap_or(s);
        Some(match name {
            "HUP" | "1" => KillSignal::Hup,
            "INT" | "2" => KillSignal::Int,
            "QUIT" | "3" => KillSignal::Quit,
            "KILL" | "9" => KillSignal::Kill,
            "USR1" | "10" => KillSignal::Usr1,
            "USR2" | "12" => KillSignal::Usr2,
            "TERM" | "15" => KillSignal::Term,
            _ => return None,
        })
    }
}

impl fmt::Display for KillSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            KillSignal::Hup => "SIGHUP",
            KillSignal::Int => "SIGINT",
            KillSignal::Quit => "SIGQUIT",
            KillSignal::Kill => "SIGKILL",
            KillSignal::Usr1 => "SIGUSR1",
            KillSignal::Usr2 => "SIGUSR2",
            KillSignal::Term => "SIGTERM",
        };
        f.write_str(s)
    }
}

/// One entry of `RestartPreventExitStatus=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitMatch {
    Code(i32),
    Signal(i32),
}

/// `LimitNOFILE=`; `None` is infinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentFile {
    pub path: AbsPath,
    /// `EnvironmentFile=-/path`: a missing file is not an error.
    pub optional: bool,
}

/// One word of `ExecStart=` after quote removal; `quoted` words are never split on expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    pub text: String,
    pub quoted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub description: Option<String>,
    pub after: Vec<String>,
    pub wants: Vec<String>,
    pub exec_start: Vec<Word>,
    pub environment: Vec<(String, String)>,
    pub environment_files: Vec<EnvironmentFile>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub working_directory: Option<AbsPath>,
    pub restart: RestartPolicy,
    pub restart_sec: Duration,
    pub restart_prevent_exit_status: Vec<ExitMatch>,
    pub kill_signal: KillSignal,
    /// `None` is `infinity`: never escalate to SIGKILL.
    pub timeout_stop: Option<Duration>,
    pub limit_nofile: Option<Limit>,
    pub nice: Option<i32>,
    pub wanted_by: Vec<String>,
}

impl Unit {
    /// systemd's defaults for everything the text does not set.
    fn empty() -> Self {
        Unit {
            description: None,
            after: Vec::new(),
            wants: Vec::new(),
            exec_start: Vec::new(),
            environment: Vec::new(),
            environment_files: Vec::new(),
            user: None,
            group: None,
            working_directory: None,
            restart: RestartPolicy::No,
            restart_sec: Duration::from_millis(100),
            restart_prevent_exit_status: Vec::new(),
            kill_signal: KillSignal::Term,
            timeout_stop: Some(Duration::from_secs(90)),
            limit_nofile: None,
            nice: None,
            wanted_by: Vec::new(),
        }
    }

    /// The variables `ExecStart=` sees: `Environment=` then each `EnvironmentFile=`, later
    /// assignments winning, as systemd orders them. `files` holds the files' contents in order
    /// (`None` for a missing optional file).
    pub fn environment_with(&self, files: &[Option<String>]) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = self.environment.iter().cloned().collect();
        for text in files.iter().flatten() {
            env.extend(parse_environment_file(text));
        }
        env
    }

    /// `ExecStart=` expanded as systemd does: a word that is exactly `$VAR` becomes the value
    /// split at whitespace (zero or more arguments; one when quoted); `${VAR}` anywhere is replaced by the exact
    /// value inside one argument; `$$` is a literal `$`. Unset variables expand to nothing.
    pub fn exec_argv(&self, env: &BTreeMap<String, String>) -> Vec<String> {
        let mut argv = Vec::new();
        for w in &self.exec_start {
            if let Some(name) = w.text.strip_prefix('$').filter(|n| is_var_name(n)) {
                match (w.quoted, env.get(name)) {
                    // A quoted "$VAR" stays one argument, as a shell would keep it.
                    (true, v) => argv.push(v.cloned().unwrap_or_default()),
                    (false, Some(v)) => argv.extend(v.split_whitespace().map(str::to_owned)),
                    (false, None) => {}
                }
                continue;
            }
            argv.push(expand_braced(&w.text, env));
        }
        argv
    }
}

fn is_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn expand_braced(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix("${") {
            match inner.find('}') {
                Some(end) if is_var_name(&inner[..end]) => {
                    out.push_str(env.get(&inner[..end]).map(String::as_str).unwrap_or(""));
                    rest = &inner[end + 1..];
                }
                _ => {
                    out.push('$');
                    rest = &tail[1..];
                }
            }
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Splits a command line into words: whitespace separates, `"…"` and `'…'` quote, backslash
/// escapes the next character (`\n`, `\t` as in C).
pub fn split_words(s: &str) -> Result<Vec<Word>, &'static str> {
    let mut words = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(words);
        }
        let mut text = String::new();
        let mut quoted = false;
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            match c {
                '"' | '\'' => {
                    quoted = true;
                    loop {
                        match chars.next() {
                            None => return Err("unterminated quote"),
                            Some(q) if q == c => break,
                            Some('\\') if c == '"' => match chars.next() {
                                None => return Err("trailing backslash"),
                                Some(e) => text.push(unescape(e)),
                            },
                            Some(other) => text.push(other),
                        }
                    }
                }
                '\\' => match chars.next() {
                    None => return Err("trailing backslash"),
                    Some(e) => text.push(unescape(e)),
                },
                other => text.push(other),
            }
        }
        words.push(Word { text, quoted });
    }
}

fn unescape(c: char) -> char {
    match c {
        'n' => '\n',
        't' => '\t',
        other => other,
    }
}

/// `KEY=VALUE` lines as systemd's `EnvironmentFile=` reads them: `#`/`;` comments, blank lines,
/// optional matching quotes around the value. Lines without `=` are ignored.
pub fn parse_environment_file(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let k = k.trim();
        if !is_var_name(k) {
            continue;
        }
        let v = v.trim();
        let v = match (v.chars().next(), v.chars().last()) {
            (Some(a), Some(b)) if v.len() >= 2 && a == b && (a == '"' || a == '\'') => {
                &v[1..v.len() - 1]
            }
            _ => v,
        };
        out.push((k.to_owned(), v.to_owned()));
    }
    out
}

/// systemd time spans: `90`, `3s`, `100ms`, `1min 30s`, `infinity` (→ `None`).
pub fn parse_timespan(s: &str) -> Result<Option<Duration>, String> {
    let s = s.trim();
    if s == "infinity" {
        return Ok(None);
    }
    if s.is_empty() {
        return Err("empty time span".into());
    }
    let mut total = Duration::ZERO;
    for tok in s.split_whitespace() {
        let split = tok
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(tok.len());
        let (num, unit) = tok.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{tok:?} is not a number"))?;
        let scale = match unit {
            "" | "s" | "sec" | "second" | "seconds" => 1.0,
            "ms" | "msec" => 1e-3,
            "us" | "usec" => 1e-6,
            "m" | "min" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hour" | "hours" => 3600.0,
            other => return Err(format!("unknown time unit {other:?}")),
        };
        total += Duration::from_secs_f64(n * scale);
    }
    Ok(Some(total))
}

pub fn parse_limit(s: &str) -> Result<Limit, String> {
    let one = |v: &str| -> Result<Option<u64>, String> {
        if v == "infinity" {
            Ok(None)
        } else {
            v.parse()
                .map(Some)
                .map_err(|_| format!("{v:?} is not a number or infinity"))
        }
    };
    match s.split_once(':') {
        Some((soft, hard)) => Ok(Limit {
            soft: one(soft)?,
            hard: one(hard)?,
        }),
        None => {
            let v = one(s)?;
            Ok(Limit { soft: v, hard: v })
        }
    }
}

/// Parses unit text. Unknown sections and keys are errors naming them.
pub fn parse(text: &str) -> Result<Unit, UnitError> {
    let mut unit = Unit::empty();
    let mut section: Option<String> = None;
    let mut lines = text.lines().enumerate().peekable();
    let mut saw_exec = false;
    while let Some((idx, raw)) = lines.next() {
        let line_no = idx + 1;
        let mut line = raw.trim().to_owned();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        // Continuation lines: a trailing backslash joins the next line with a space; comment
        // lines inside a continuation are skipped, as systemd does.
        while line.ends_with('\\') {
            line.pop();
            line.push(' ');
            loop {
                match lines.next() {
                    None => break,
                    Some((_, next)) => {
                        let t = next.trim();
                        if t.starts_with('#') || t.starts_with(';') {
                            continue;
                        }
                        line.push_str(t);
                        break;
                    }
                }
            }
        }
        if let Some(name) = line.strip_prefix('[') {
            let name = name.strip_suffix(']').ok_or(UnitError::Syntax {
                line: line_no,
                reason: "section header without ]",
            })?;
            if !matches!(name, "Unit" | "Service" | "Install") {
                return Err(UnitError::UnknownSection {
                    line: line_no,
                    section: name.to_owned(),
                });
            }
            section = Some(name.to_owned());
            continue;
        }
        let (key, value) = line.split_once('=').ok_or(UnitError::Syntax {
            line: line_no,
            reason: "expected Key=value",
        })?;
        let (key, value) = (key.trim(), value.trim());
        let sect = section.as_deref().ok_or(UnitError::Syntax {
            line: line_no,
            reason: "assignment before any [Section]",
        })?;
        let invalid = |reason: String| UnitError::Invalid {
            line: line_no,
            key: key.to_owned(),
            value: value.to_owned(),
            reason,
        };
        let list = |v: &str| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        match (sect, key) {
            ("Unit", "Description") => unit.description = Some(value.to_owned()),
            ("Unit", "After") => extend_or_reset(&mut unit.after, list(value)),
            ("Unit", "Wants") => extend_or_reset(&mut unit.wants, list(value)),
            ("Service", "Type") => {
                if value != "simple" {
                    return Err(invalid("only Type=simple is supported".into()));
                }
            }
            ("Service", "ExecStart") => {
                if value.is_empty() {
                    unit.exec_start.clear();
                    saw_exec = false;
                    continue;
                }
                if saw_exec {
                    return Err(invalid("Type=simple takes exactly one ExecStart=".into()));
                }
                if value.starts_with(['-', '@', '+', '!', ':']) {
                    return Err(invalid("ExecStart= prefixes are not supported".into()));
                }
                let words = split_words(value).map_err(|r| invalid(r.into()))?;
                let Some(first) = words.first() else {
                    return Err(invalid("empty command".into()));
                };
                if !first.text.starts_with('/') {
                    return Err(invalid("the program must be an absolute path".into()));
                }
                unit.exec_start = words;
                saw_exec = true;
            }
            ("Service", "Environment") => {
                if value.is_empty() {
                    unit.environment.clear();
                    continue;
                }
                for w in split_words(value).map_err(|r| invalid(r.into()))? {
                    let (k, v) = w
                        .text
                        .split_once('=')
                        .filter(|(k, _)| is_var_name(k))
                        .ok_or_else(|| invalid(format!("{:?} is not NAME=value", w.text)))?;
                    unit.environment.push((k.to_owned(), v.to_owned()));
                }
            }
            ("Service", "EnvironmentFile") => {
                if value.is_empty() {
                    unit.environment_files.clear();
                    continue;
                }
                let (optional, p) = match value.strip_prefix('-') {
                    Some(p) => (true, p),
                    None => (false, value),
                };
                let path = p.parse().map_err(|e| invalid(format!("{e}")))?;
                unit.environment_files
                    .push(EnvironmentFile { path, optional });
            }
            ("Service", "User") => unit.user = Some(value.to_owned()),
            ("Service", "Group") => unit.group = Some(value.to_owned()),
            ("Service", "WorkingDirectory") => {
                let p = value.strip_prefix('-').unwrap_or(value);
                unit.working_directory = Some(p.parse().map_err(|e| invalid(format!("{e}")))?);
            }
            ("Service", "Restart") => {
                unit.restart = match value {
                    "no" => RestartPolicy::No,
                    "on-failure" => RestartPolicy::OnFailure,
                    "always" => RestartPolicy::Always,
                    _ => return Err(invalid("supported: no, on-failure, always".into())),
                }
            }
            ("Service", "RestartSec") => {
                unit.restart_sec = parse_timespan(value)
                    .map_err(invalid)?
                    .ok_or_else(|| invalid("RestartSec cannot be infinity".into()))?;
            }
            ("Service", "RestartPreventExitStatus") => {
                if value.is_empty() {
                    unit.restart_prevent_exit_status.clear();
                    continue;
                }
                for tok in value.split_whitespace() {
                    let m = match tok.parse::<i32>() {
                        Ok(code) if (0..=255).contains(&code) => ExitMatch::Code(code),
                        _ => ExitMatch::Signal(
                            KillSignal::parse(tok)
                                .ok_or_else(|| invalid(format!("{tok:?} is not an exit status")))?
                                .number(),
                        ),
                    };
                    unit.restart_prevent_exit_status.push(m);
                }
            }
            ("Service", "KillSignal") => {
                unit.kill_signal =
                    KillSignal::parse(value).ok_or_else(|| invalid("unsupported signal".into()))?;
            }
            ("Service", "TimeoutStopSec") => {
                unit.timeout_stop = parse_timespan(value).map_err(invalid)?;
            }
            ("Service", "LimitNOFILE") => {
                unit.limit_nofile = Some(parse_limit(value).map_err(invalid)?);
            }
            ("Service", "Nice") => {
                let n: i32 = value
                    .parse()
                    .map_err(|_| invalid("not an integer".into()))?;
                if !(-20..=19).contains(&n) {
                    return Err(invalid("Nice= must be in -20..=19".into()));
                }
                unit.nice = Some(n);
            }
            ("Install", "WantedBy") => extend_or_reset(&mut unit.wanted_by, list(value)),
            _ => {
                return Err(UnitError::UnknownKey {
                    line: line_no,
                    section: sect.to_owned(),
                    key: key.to_owned(),
                })
            }
        }
    }
    if unit.exec_start.is_empty() {
        return Err(UnitError::MissingExecStart);
    }
    Ok(unit)
}

fn extend_or_reset(list: &mut Vec<String>, items: Vec<String>) {
    if items.is_empty() {
        list.clear();
    } else {
        list.extend(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The ai-memory unit of the reference spec §3.1, verbatim shape.
    pub const AI_MEMORY: &str = r#"[Unit]
Description=ai-memory federated daemon (do-1461 peer nyc3-01)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
Environment=HOME=/root
EnvironmentFile=/etc/ai-memory/ai-memory.env
ExecStart=/usr/local/bin/ai-memory serve \
  --host 0.0.0.0 \
  --port 9077 \
  --store-url ${AI_MEMORY_STORE_URL} \
  --quorum-writes 2 \
  --federation-identity do-1461/nyc3/peer-01 \
  --shutdown-grace-secs 30
Restart=on-failure
RestartPreventExitStatus=75
RestartSec=3
KillSignal=SIGINT
TimeoutStopSec=90
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"#;

    #[test]
    fn parses_the_reference_unit() {
        let u = parse(AI_MEMORY).unwrap();
        assert_eq!(u.after, ["network-online.target"]);
        assert_eq!(u.kill_signal, KillSignal::Int);
        assert_eq!(u.restart, RestartPolicy::OnFailure);
        assert_eq!(u.restart_sec, Duration::from_secs(3));
        assert_eq!(u.restart_prevent_exit_status, [ExitMatch::Code(75)]);
        assert_eq!(u.timeout_stop, Some(Duration::from_secs(90)));
        assert_eq!(
            u.limit_nofile,
            Some(Limit {
                soft: Some(65536),
                hard: Some(65536)
            })
        );
        assert_eq!(u.environment, [("HOME".to_owned(), "/root".to_owned())]);
        assert_eq!(
            u.environment_files[0].path.as_str(),
            "/etc/ai-memory/ai-memory.env"
        );
        assert!(!u.environment_files[0].optional);
        assert_eq!(u.wanted_by, ["multi-user.target"]);

        let env = u.environment_with(&[Some(
            "AI_MEMORY_STORE_URL=postgres://u:p w@10.0.0.2/db\n".into(),
        )]);
        let argv = u.exec_argv(&env);
        assert_eq!(argv[0], "/usr/local/bin/ai-memory");
        assert_eq!(argv[1], "serve");
        let i = argv.iter().position(|a| a == "--store-url").unwrap();
        // ${VAR} is one argument even when the value holds whitespace.
        assert_eq!(argv[i + 1], "postgres://u:p w@10.0.0.2/db");
        assert_eq!(argv.last().unwrap(), "30");
    }

    #[test]
    fn dollar_var_splits_and_braced_var_does_not() {
        let u = parse(
            "[Service]\nEnvironment=\"ARGS=-a -b\" X=1\nExecStart=/bin/prog $ARGS ${ARGS} \"$ARGS\" pre-${X}-post $$HOME $UNSET\n",
        )
        .unwrap();
        let env = u.environment_with(&[]);
        assert_eq!(
            u.exec_argv(&env),
            [
                "/bin/prog",
                "-a",
                "-b",
                "-a -b",
                "-a -b",
                "pre-1-post",
                "$HOME"
            ]
        );
    }

    #[test]
    fn environment_file_overrides_environment_in_order() {
        let u = parse(
            "[Service]\nEnvironment=A=unit B=unit\nEnvironmentFile=-/etc/missing\nEnvironmentFile=/etc/x.env\nExecStart=/bin/true\n",
        )
        .unwrap();
        assert!(u.environment_files[0].optional);
        let env =
            u.environment_with(&[None, Some("# c\nB=\"file\"\n\nC='q'\nnot a line\n".into())]);
        assert_eq!(env["A"], "unit");
        assert_eq!(env["B"], "file");
        assert_eq!(env["C"], "q");
        assert_eq!(env.len(), 3);
    }

    #[test]
    fn unknown_keys_and_sections_are_named() {
        let err = parse("[Service]\nExecStart=/bin/true\nProtectSystem=strict\n").unwrap_err();
        assert_eq!(
            err,
            UnitError::UnknownKey {
                line: 3,
                section: "Service".into(),
                key: "ProtectSystem".into()
            }
        );
        assert!(err.to_string().contains("ProtectSystem"));
        let err = parse("[Timer]\nOnCalendar=daily\n").unwrap_err();
        assert!(matches!(err, UnitError::UnknownSection { .. }), "{err}");
        assert!(matches!(
            parse("[Service]\nType=forking\nExecStart=/bin/true\n"),
            Err(UnitError::Invalid { .. })
        ));
        assert!(matches!(
            parse("[Service]\nExecStart=-/bin/true\n"),
            Err(UnitError::Invalid { .. })
        ));
        assert!(matches!(
            parse("[Service]\nRestart=on-abnormal\nExecStart=/bin/true\n"),
            Err(UnitError::Invalid { .. })
        ));
        assert_eq!(
            parse("[Service]\nUser=x\n"),
            Err(UnitError::MissingExecStart)
        );
    }

    #[test]
    fn timespans() {
        assert_eq!(parse_timespan("3"), Ok(Some(Duration::from_secs(3))));
        assert_eq!(
            parse_timespan("100ms"),
            Ok(Some(Duration::from_millis(100)))
        );
        assert_eq!(
            parse_timespan("1min 30s"),
            Ok(Some(Duration::from_secs(90)))
        );
        assert_eq!(parse_timespan("0.5s"), Ok(Some(Duration::from_millis(500))));
        assert_eq!(parse_timespan("infinity"), Ok(None));
        assert!(parse_timespan("3 fortnights").is_err());
    }

    proptest! {
        #[test]
        fn quoted_words_roundtrip(words in proptest::collection::vec("[ -~]{0,12}", 1..6)) {
            let line = words
                .iter()
                .map(|w| format!("\"{}\"", w.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect::<Vec<_>>()
                .join(" ");
            let parsed: Vec<String> = split_words(&line).unwrap().into_iter().map(|w| w.text).collect();
            prop_assert_eq!(parsed, words);
        }

        #[test]
        fn parse_never_panics(text in "[\\[\\]A-Za-z=\\\\ \n$\"'/]{0,200}") {
            let _ = parse(&text);
        }
    }
}
