//! Quoting a value into the two formats roles render secrets into, as minijinja filters: a
//! systemd `EnvironmentFile=` value (`| env_value`) and a PostgreSQL string constant
//! (`| pg_string`). `seeder publish` already refuses secrets outside a safe character set
//! ([`crate::campaign::check_secret_chars`]); these make the files right for any value they
//! accept, and refuse the rest, so a role never depends on that check to stay well-formed.
//! Errors never carry the value.

use minijinja::{Error, ErrorKind};

/// `'value'`: one line of an environment file, read literally by systemd (a single-quoted value
/// has no escapes and no `$` expansion), by the agent's own reader
/// (`bootstrap::unit::parse_environment_file` strips the matching quotes) and by a POSIX shell
/// that sources the file. Refused: a single quote (it would end the quoting) and any control
/// character (a newline would start a new `KEY=` line).
pub fn env_value(value: &str) -> Result<String, Error> {
    if let Some(c) = value.chars().find(|&c| c == '\'' || c.is_control()) {
        let class = match c {
            '\'' => "a single quote",
            '\n' => "a newline",
            _ => "a control character",
        };
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("env_value: the value holds {class}, which an environment file cannot carry literally (the value is withheld)"),
        ));
    }
    Ok(format!("'{value}'"))
}

/// A dollar-quoted string constant, `$hs$value$hs$`, whose tag (`hs`, `hs1`, `hs2`, …) does not
/// occur where it would end the constant early: nothing in the value is interpreted (no `''`,
/// no backslash escapes, whatever `standard_conforming_strings` says), and psql's lexer passes
/// it through without expanding `:variables` or meta-commands. Refused: NUL, which a PostgreSQL
/// text value cannot hold. Use it outside any other dollar-quoted block (a `$$` in the value
/// would end that block).
pub fn pg_string(value: &str) -> Result<String, Error> {
    if value.contains('\0') {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "pg_string: the value holds a NUL byte, which PostgreSQL text cannot hold (the value is withheld)",
        ));
    }
    let tag = (0..)
        .map(|n| match n {
            0 => "$hs$".to_owned(),
            n => format!("$hs{n}$"),
        })
        .find(|tag| dollar_quote_ends_at(value, tag) == Some(value.len()))
        .expect("a value of n bytes holds fewer than n distinct tags");
    Ok(format!("{tag}{value}{tag}"))
}

/// Where a dollar-quoted constant opened with `tag` and holding `value` ends, as the lexer scans
/// it: at the first `tag` in `value` followed by the closing tag.
fn dollar_quote_ends_at(value: &str, tag: &str) -> Option<usize> {
    format!("{value}{tag}").find(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_value_single_quotes_anything_but_quotes_and_control_characters() {
        for v in [
            "abc",
            "a b",
            "$$x$",
            "a\"b",
            "back\\slash",
            "#not a comment",
            "${HOME}",
            "",
        ] {
            let q = env_value(v).unwrap();
            assert_eq!(q, format!("'{v}'"));
            assert_eq!(q.lines().count(), 1, "{q}");
        }
        for (v, class) in [
            ("pw\nAI_MEMORY_FED_REQUIRE_SIG=0", "a newline"),
            ("pw\r", "a control character"),
            ("pw\0", "a control character"),
            ("it's", "a single quote"),
        ] {
            let e = env_value(v).unwrap_err().to_string();
            assert!(e.contains(class), "{v:?}: {e}");
            assert!(
                !e.contains("pw") && !e.contains("it's"),
                "the value leaked: {e}"
            );
        }
    }

    #[test]
    fn pg_string_picks_a_tag_the_value_cannot_close() {
        for (v, want) in [
            ("abc", "$hs$abc$hs$"),
            ("x$$y", "$hs$x$$y$hs$"),
            ("a'b\\c", "$hs$a'b\\c$hs$"),
            ("a$hs$b", "$hs1$a$hs$b$hs1$"),
            // Ends in the tag's first part: `$hs` + the closing `$hs$` would close at `$hs$`.
            ("pw$hs", "$hs1$pw$hs$hs1$"),
            ("$hs$hs1$", "$hs2$$hs$hs1$$hs2$"),
            ("", "$hs$$hs$"),
        ] {
            let q = pg_string(v).unwrap();
            assert_eq!(q, want, "{v:?}");
            let tag = &q[..q[1..].find('$').unwrap() + 2];
            assert_eq!(dollar_quote_ends_at(v, tag), Some(v.len()), "{v:?} -> {q}");
        }
        let e = pg_string("pw\0x").unwrap_err().to_string();
        assert!(e.contains("NUL") && !e.contains("pw"), "{e}");
    }
}
