//! Device tags and tag selectors, spelled like Kubernetes label selectors:
//! `group=lab`, `group==lab`, `group!=lab`, `group in (lab,field)`, `group notin (lab)`,
//! `group` (has the tag), `!group` (has not), joined by commas (all must hold).

use std::collections::BTreeMap;

pub type Tags = BTreeMap<String, String>;

/// Longest tag key or value.
pub const MAX_TAG_LEN: usize = 63;

/// Keys and values: letters, digits, `-`, `_`, `.`, `/` (keys may not be empty).
pub fn valid_tag_part(s: &str, key: bool) -> bool {
    s.len() <= MAX_TAG_LEN
        && (!key || !s.is_empty())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

/// `key=value` as given on a command line.
pub fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}` is not a tag: write key=value"))?;
    let (k, v) = (k.trim(), v.trim());
    if !valid_tag_part(k, true) || !valid_tag_part(v, false) {
        return Err(format!(
            "`{s}`: tag keys and values are up to {MAX_TAG_LEN} letters, digits, `-`, `_`, `.` or `/`"
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    pub fn matches(&self, tags: &Tags) -> bool {
        match self {
            Requirement::Eq(k, v) => tags.get(k) == Some(v),
            Requirement::NotEq(k, v) => tags.get(k) != Some(v),
            Requirement::In(k, vs) => tags.get(k).is_some_and(|t| vs.contains(t)),
            Requirement::NotIn(k, vs) => tags.get(k).is_none_or(|t| !vs.contains(t)),
            Requirement::Exists(k) => tags.contains_key(k),
            Requirement::NotExists(k) => !tags.contains_key(k),
        }
    }
}

/// A conjunction of requirements; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(pub Vec<Requirement>);

impl Selector {
    pub fn parse(s: &str) -> Result<Selector, String> {
        let mut reqs = Vec::new();
        for part in split_top(s)? {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            reqs.push(requirement(part)?);
        }
        Ok(Selector(reqs))
    }

    pub fn matches(&self, tags: &Tags) -> bool {
        self.0.iter().all(|r| r.matches(tags))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|r| match r {
                Requirement::Eq(k, v) => format!("{k}={v}"),
                Requirement::NotEq(k, v) => format!("{k}!={v}"),
                Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::NotExists(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Result<Vec<&str>, String> {
    let (mut depth, mut start, mut out) = (0i32, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(format!("selector `{s}`: unbalanced parentheses"));
        }
    }
    if depth != 0 {
        return Err(format!("selector `{s}`: unbalanced parentheses"));
    }
    out.push(&s[start..]);
    Ok(out)
}

fn requirement(p: &str) -> Result<Requirement, String> {
    let key = |k: &str| -> Result<String, String> {
        let k = k.trim();
        if valid_tag_part(k, true) { Ok(k.to_string()) } else { Err(format!("`{p}`: `{k}` is not a tag key")) }
    };
    let value = |v: &str| -> Result<String, String> {
        let v = v.trim();
        if valid_tag_part(v, false) { Ok(v.to_string()) } else { Err(format!("`{p}`: `{v}` is not a tag value")) }
    };
    if let Some(k) = p.strip_prefix('!') {
        return Ok(Requirement::NotExists(key(k)?));
    }
    if let Some((k, v)) = p.split_once("!=") {
        return Ok(Requirement::NotEq(key(k)?, value(v)?));
    }
    if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
        return Ok(Requirement::Eq(key(k)?, value(v)?));
    }
    for (op, notin) in [(" notin ", true), (" in ", false)] {
        if let Some((k, rest)) = p.split_once(op) {
            let rest = rest.trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("`{p}`: write the values in parentheses, e.g. `{} in (a,b)`", k.trim()))?;
            let vs = inner.split(',').map(value).collect::<Result<Vec<_>, _>>()?;
            return Ok(if notin { Requirement::NotIn(key(k)?, vs) } else { Requirement::In(key(k)?, vs) });
        }
    }
    Ok(Requirement::Exists(key(p)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(s: &[(&str, &str)]) -> Tags {
        s.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selectors_match_like_kubectl() {
        let lab = tags(&[("group", "lab"), ("arch", "aarch64")]);
        let field = tags(&[("group", "field")]);
        let none = tags(&[]);
        let cases: &[(&str, [bool; 3])] = &[
            ("", [true, true, true]),
            ("group=lab", [true, false, false]),
            ("group==lab", [true, false, false]),
            ("group!=lab", [false, true, true]),
            ("group in (lab, field)", [true, true, false]),
            ("group notin (lab)", [false, true, true]),
            ("group", [true, true, false]),
            ("!group", [false, false, true]),
            ("group=lab,arch=aarch64", [true, false, false]),
            ("group in (lab,field),!arch", [false, true, false]),
        ];
        for (sel, want) in cases {
            let s = Selector::parse(sel).unwrap();
            let got = [s.matches(&lab), s.matches(&field), s.matches(&none)];
            assert_eq!(&got, want, "{sel}");
            // Display reparses to the same selector.
            assert_eq!(Selector::parse(&s.to_string()).unwrap(), s, "{sel}");
        }
    }

    #[test]
    fn bad_selectors_and_tags_say_why() {
        for bad in ["group=(", "group in lab", "a b", "group in (lab", "=x", "k=v v"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_tag("group=lab"), Ok(("group".into(), "lab".into())));
        assert_eq!(parse_tag("group="), Ok(("group".into(), "".into())));
        assert!(parse_tag("group").is_err());
        assert!(parse_tag("gr oup=x").is_err());
    }
}
