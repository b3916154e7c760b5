//! What a policy reads of its input, found in its tokens: every `input.a.b` (or `input["a"]`)
//! reference, up to its first step that is not a literal name, and every call of a builtin whose
//! answer is not a function of its arguments (`time.now_ns`, `http.send`, ...). The decision
//! cache keys on the first, so a call that differs only in what the policy never reads (a request
//! id, the time) reuses the decision; and it turns itself on only where there are none of the
//! second. Tokens, not the syntax tree: a reference of any shape the scan does not follow (`input`
//! passed whole to a function, `input[x]`) widens what is read, never narrows it. The target of
//! `with input… as` (in tests, mostly) is a replacement, not a read.

use crate::{PolicyError, Sources};
use regorus::unstable::{Lexer, TokenKind};

/// Builtins whose answer can change between two calls with the same arguments (those OPA marks
/// non-deterministic): a decision that used one cannot be reused.
const IMPURE_BUILTINS: &[&str] = &[
    "http.send",
    "net.lookup_ip_addr",
    "opa.runtime",
    "rand.intn",
    "time.now_ns",
    "uuid.rfc4122",
    "io.jwt.decode_verify",
    "crypto.x509.parse_and_verify_certificates",
    "crypto.x509.parse_and_verify_certificates_with_options",
];

/// A place in the policy's sources: `file:line`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At(pub String);

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the policy's modules read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    /// Input paths read (`["llm", "model"]`; empty: the whole input), each with where it is
    /// first read; sorted, and none below another (reading `input.llm` covers `input.llm.model`).
    pub paths: Vec<(Vec<String>, At)>,
    /// Non-deterministic builtins called, each with where it is first called.
    pub impure: Vec<(String, At)>,
}

impl Reads {
    /// Scans every module. Errors are the lexer's (a module that does not lex does not compile
    /// either, so in practice compilation reports it first).
    pub fn of(sources: &Sources) -> Result<Reads, PolicyError> {
        let mut paths = Vec::new();
        let mut impure = Vec::new();
        for (file, text) in &sources.modules {
            let tokens = tokens(file, text)?;
            let at = |t: &Tok| At(format!("{file}:{}", t.line));
            for (i, t) in tokens.iter().enumerate() {
                // `x.input` is a field; `with input as …` replaces the input, reading nothing.
                let after = |w: &str| i > 0 && tokens[i - 1].text == w;
                if t.kind != Kind::Ident || after(".") || after("with") {
                    continue;
                }
                if t.text == "input" {
                    paths.push((chain(&tokens[i + 1..]), at(t)));
                } else if let Some(name) = call_name(&tokens[i..]) {
                    let seen = impure.iter().any(|(n, _)| *n == name);
                    if IMPURE_BUILTINS.contains(&name.as_str()) && !seen {
                        impure.push((name, at(t)));
                    }
                }
            }
        }
        paths.sort_by(|a, b| a.0.cmp(&b.0));
        // Sorted, a path's ancestors come before it: keep only paths no kept path covers.
        let mut kept: Vec<(Vec<String>, At)> = Vec::new();
        for (p, at) in paths {
            if !kept.iter().any(|(k, _)| p.starts_with(k)) {
                kept.push((p, at));
            }
        }
        Ok(Reads {
            paths: kept,
            impure,
        })
    }

    /// Where the policy reads `input.<field>` by name, if it does.
    pub fn reads_field(&self, field: &str) -> Option<&At> {
        self.paths
            .iter()
            .find(|(p, _)| p.first().is_some_and(|f| f == field))
            .map(|(_, at)| at)
    }

    /// The paths as `/input/a/b`, as the configuration writes them.
    pub fn pointers(&self) -> Vec<String> {
        self.paths.iter().map(|(p, _)| pointer(p)).collect()
    }
}

/// `/input/a/b` for `["a", "b"]`.
pub fn pointer(path: &[String]) -> String {
    std::iter::once("/input")
        .chain(path.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join("/")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ident,
    /// A string literal with no escape in it: its text is its value.
    PlainString,
    Symbol,
    Other,
}

#[derive(Debug)]
struct Tok {
    kind: Kind,
    text: String,
    line: u32,
}

impl Tok {
    fn is(&self, symbol: &str) -> bool {
        self.kind == Kind::Symbol && self.text == symbol
    }
}

fn tokens(file: &str, text: &str) -> Result<Vec<Tok>, PolicyError> {
    let source = regorus::Source::from_contents(file.to_string(), text.to_string())
        .map_err(|e| PolicyError::Compile(e.to_string()))?;
    let mut lexer = Lexer::new(&source);
    let mut out = Vec::new();
    loop {
        let t = lexer
            .next_token()
            .map_err(|e| PolicyError::Compile(crate::engine::one_line(&e.to_string())))?;
        let kind = match t.0 {
            TokenKind::Eof => return Ok(out),
            TokenKind::Ident => Kind::Ident,
            TokenKind::Symbol => Kind::Symbol,
            TokenKind::String if !t.1.text().contains('\\') => Kind::PlainString,
            _ => Kind::Other,
        };
        out.push(Tok {
            kind,
            text: t.1.text().to_string(),
            line: t.1.line,
        });
    }
}

/// The literal steps after `input`: `.name` or `["name"]`, until the first other token.
fn chain(rest: &[Tok]) -> Vec<String> {
    let mut path = Vec::new();
    let mut i = 0;
    loop {
        match rest.get(i..i + 3) {
            Some([dot, name, ..]) if dot.is(".") && name.kind == Kind::Ident => {
                path.push(name.text.clone());
                i += 2;
            }
            Some([open, name, close])
                if open.is("[") && name.kind == Kind::PlainString && close.is("]") =>
            {
                path.push(name.text.clone());
                i += 3;
            }
            _ => match rest.get(i..i + 2) {
                // A name as the very last tokens of a module.
                Some([dot, name]) if dot.is(".") && name.kind == Kind::Ident => {
                    path.push(name.text.clone());
                    return path;
                }
                _ => return path,
            },
        }
    }
}

/// `a.b.c` when the tokens are a dotted name followed by `(`: a call.
fn call_name(from: &[Tok]) -> Option<String> {
    let mut name = from.first()?.text.clone();
    let mut i = 1;
    while from.get(i)?.is(".") && from.get(i + 1)?.kind == Kind::Ident {
        name.push('.');
        name.push_str(&from[i + 1].text);
        i += 2;
    }
    from.get(i)?.is("(").then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads(rego: &str) -> Reads {
        let sources = Sources {
            modules: vec![("p.rego".into(), rego.into())],
            data: serde_json::json!({}),
            revision: "r".into(),
        };
        Reads::of(&sources).unwrap()
    }

    fn paths(rego: &str) -> Vec<String> {
        reads(rego).pointers()
    }

    #[test]
    fn names_and_string_steps_are_followed_until_the_first_other_step() {
        let p = paths(
            r#"package p
import rego.v1
allow if input.llm.model == "gpt-4o-mini"
allow if input["source"]["agent"] == "planner"
allow if input.request.headers[h] == "x"
allow if count(input.mcp.arguments[0]) > 1
deny if input.a2a["we\"ird"]
# input.user.sub in a comment is not read
msg := "input.budget in a string is not read"
x := data.input.not_the_input
test_allow if allow with input as {"llm": {"model": "gpt-4o-mini"}}
test_deny if not allow with input.llm.model as "gpt-5"
"#,
        );
        assert_eq!(
            p,
            [
                "/input/a2a",
                "/input/llm/model",
                "/input/mcp/arguments",
                "/input/request/headers",
                "/input/source/agent"
            ]
        );
    }

    #[test]
    fn a_read_of_a_parent_covers_its_children_and_a_whole_read_covers_all() {
        assert_eq!(
            paths("package p\nx := input.llm.model\ny := input.llm\nz := input.llm.stream"),
            ["/input/llm"]
        );
        assert_eq!(
            paths("package p\nx := input.llm.model\ny := json.marshal(input)"),
            ["/input"]
        );
        // An alias reads what the import names.
        assert_eq!(
            paths("package p\nimport input.mcp as m\nallow if m.tool == \"add\""),
            ["/input/mcp"]
        );
        assert_eq!(paths("package p\nallow := true"), Vec::<String>::new());
    }

    #[test]
    fn impure_builtins_are_found_with_where_they_are_called() {
        let r = reads(
            "package p\nimport rego.v1\n\nallow if time.now_ns() > 0\nx := rand.intn(\"k\", 10)\ny := time.add_date(1, 0, 0, 0)",
        );
        let names: Vec<_> = r.impure.iter().map(|(n, at)| format!("{n}@{at}")).collect();
        assert_eq!(names, ["time.now_ns@p.rego:4", "rand.intn@p.rego:5"]);
        assert_eq!(r.reads_field("time"), None);
        let r = reads("package p\nallow if input.time < \"2027\"");
        assert_eq!(
            r.reads_field("time").map(|a| a.0.as_str()),
            Some("p.rego:2")
        );
    }
}
