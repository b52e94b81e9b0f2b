//! Table, JSON or YAML output.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// The structured format chosen for this run (`--output json|yaml`), set once by `main`.
pub static FORMAT: std::sync::OnceLock<Output> = std::sync::OnceLock::new();

/// Print a value in the run's structured format (JSON unless `--output yaml`).
pub fn json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    let value = serde_json::to_value(v)?;
    if FORMAT.get() == Some(&Output::Yaml) {
        let mut s = String::new();
        yaml(&value, 0, &mut s);
        print!("{s}");
    } else {
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(())
}

/// A YAML 1.2 block rendering of a JSON value (every JSON document is YAML; this is the
/// readable form). Strings that could read as another type, or hold special characters, are
/// double-quoted with JSON escapes, which YAML reads the same.
fn yaml(v: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value;
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, val) in m {
                out.push_str(&format!("{pad}{}:", scalar_str(k)));
                nested(val, indent, out);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for val in a {
                out.push_str(&format!("{pad}-"));
                match val {
                    Value::Object(m) if !m.is_empty() => {
                        // The first key on the dash's line, the rest under it.
                        let mut first = true;
                        for (k, x) in m {
                            if first {
                                out.push_str(&format!(" {}:", scalar_str(k)));
                                first = false;
                            } else {
                                out.push_str(&format!("{pad}  {}:", scalar_str(k)));
                            }
                            nested(x, indent + 2, out);
                        }
                    }
                    _ => nested(val, indent, out),
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

fn nested(v: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            yaml(v, indent + 2, out);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            yaml(v, indent + 2, out);
        }
        other => out.push_str(&format!(" {}\n", scalar(other))),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => scalar_str(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

fn scalar_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '/')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-./@+".contains(c))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n" | "~"
        );
    if plain { s.to_string() } else { serde_json::Value::String(s.to_string()).to_string() }
}

/// Print rows under a header with columns padded to fit.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

/// A duration in µs for people: `850 µs`, `12.3 ms`, `1.52 s`.
pub fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{:.1} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_block_style_and_quotes_ambiguous_strings() {
        let v = serde_json::json!({
            "id": "r-1", "state": "running", "n": 3, "ok": true, "none": null, "odd": "yes", "num": "12",
            "waves": [{"spec": "5%", "gates": [{"name": "psi<=0.2", "passed": false}], "empty": []}, {"spec": "100%"}],
            "tags": {"group": "lab"}, "list": ["a", "b: c"], "nested": [[1, 2], []],
        });
        let mut s = String::new();
        yaml(&v, 0, &mut s);
        assert!(
            s.contains("state: running\n")
                && s.contains("odd: \"yes\"")
                && s.contains("    spec: \"5%\"")
                && s.contains("  - spec: \"100%\""),
            "{s}"
        );
        // Every line is `key: value`, `- item`, or a key opening a block: a shape check of the
        // layout (a YAML parser would be a dependency for a test only).
        for line in s.lines() {
            let t = line.trim_start();
            assert!(t.starts_with('-') || t.contains(':'), "{line:?} in\n{s}");
        }
    }
}
