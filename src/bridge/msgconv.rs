//! Message conversion between Matrix content and the interop content schema: formatting (Matrix
//! HTML ↔ styled ranges over code points), with everything else escaped, and plain-text
//! renderings of content Matrix has no type for.

use std::collections::BTreeSet;

use crate::wire::content::{ContactCard, Format, Location, Text, format::Style};

/// Escapes text for HTML.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' => out.push_str("<br>"),
            c => out.push(c),
        }
    }
    out
}

fn open_tag(f: &Format) -> String {
    match Style::try_from(f.style).unwrap_or(Style::Unspecified) {
        Style::Bold => "<strong>".into(),
        Style::Italic => "<em>".into(),
        Style::Strikethrough => "<del>".into(),
        Style::Monospace => "<code>".into(),
        Style::CodeBlock => "<pre><code>".into(),
        Style::Quote => "<blockquote>".into(),
        Style::Spoiler => "<span data-mx-spoiler>".into(),
        Style::Link if is_safe_url(&f.url) => format!("<a href=\"{}\">", escape(&f.url)),
        Style::Mention => String::new(),
        _ => String::new(),
    }
}

fn close_tag(f: &Format) -> &'static str {
    match Style::try_from(f.style).unwrap_or(Style::Unspecified) {
        Style::Bold => "</strong>",
        Style::Italic => "</em>",
        Style::Strikethrough => "</del>",
        Style::Monospace => "</code>",
        Style::CodeBlock => "</code></pre>",
        Style::Quote => "</blockquote>",
        Style::Spoiler => "</span>",
        Style::Link if is_safe_url(&f.url) => "</a>",
        _ => "",
    }
}

fn is_safe_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    ["https://", "http://", "mailto:", "matrix:", "tel:"]
        .iter()
        .any(|p| lower.starts_with(p))
}

/// Renders interop text as Matrix HTML, or `None` when it has no formatting. Overlapping ranges
/// are closed and reopened at each boundary, so the result always nests correctly.
pub fn text_to_html(t: &Text) -> Option<String> {
    let chars: Vec<char> = t.body.chars().collect();
    let n = chars.len();
    let formats: Vec<&Format> = t
        .formats
        .iter()
        .filter(|f| f.length > 0 && (f.start as usize) < n && !open_tag(f).is_empty())
        .collect();
    if formats.is_empty() {
        return None;
    }
    let mut bounds: BTreeSet<usize> = BTreeSet::from([0, n]);
    for f in &formats {
        bounds.insert(f.start as usize);
        bounds.insert(((f.start + f.length) as usize).min(n));
    }
    let bounds: Vec<usize> = bounds.into_iter().collect();
    let mut html = String::new();
    for w in bounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        let active: Vec<&&Format> = formats
            .iter()
            .filter(|f| (f.start as usize) <= a && b <= (f.start + f.length) as usize)
            .collect();
        for f in &active {
            html.push_str(&open_tag(f));
        }
        html.push_str(&escape(&chars[a..b].iter().collect::<String>()));
        for f in active.iter().rev() {
            html.push_str(close_tag(f));
        }
    }
    Some(html)
}

/// Parses Matrix HTML into plain text with styled ranges. Unknown tags are dropped (their text
/// kept); reply fallbacks (`<mx-reply>`) are removed.
pub fn html_to_text(html: &str) -> Text {
    let mut body: Vec<char> = Vec::new();
    let mut formats: Vec<Format> = Vec::new();
    // Open tags: (tag name, style, start, url)
    let mut open: Vec<(String, Option<Style>, usize, String)> = Vec::new();
    let mut skip_depth = 0usize;
    let mut rest = html;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('<') {
            let end = after.find('>').unwrap_or(after.len());
            let tag = &after[..end];
            rest = after.get(end + 1..).unwrap_or("");
            let closing = tag.starts_with('/');
            let tag_body = tag.trim_start_matches('/').trim_end_matches('/');
            let name: String = tag_body
                .split(|c: char| c.is_whitespace())
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            if name == "mx-reply" {
                if closing {
                    skip_depth = skip_depth.saturating_sub(1)
                } else {
                    skip_depth += 1
                }
                continue;
            }
            if skip_depth > 0 {
                continue;
            }
            match (closing, name.as_str()) {
                (false, "br") => body.push('\n'),
                (true, "p")
                | (true, "div")
                | (true, "li")
                | (true, "h1")
                | (true, "h2")
                | (true, "h3") => {
                    if !body.is_empty() && body.last() != Some(&'\n') {
                        body.push('\n');
                    }
                }
                (false, _) => {
                    let style = match name.as_str() {
                        "b" | "strong" => Some(Style::Bold),
                        "i" | "em" => Some(Style::Italic),
                        "del" | "s" | "strike" => Some(Style::Strikethrough),
                        "code" if open.iter().any(|o| o.0 == "pre") => None,
                        "code" => Some(Style::Monospace),
                        "pre" => Some(Style::CodeBlock),
                        "blockquote" => Some(Style::Quote),
                        "a" => Some(Style::Link),
                        "span" if tag_body.contains("data-mx-spoiler") => Some(Style::Spoiler),
                        _ => None,
                    };
                    let url = if name == "a" {
                        attr(tag_body, "href").unwrap_or_default()
                    } else {
                        String::new()
                    };
                    open.push((name, style, body.len(), url));
                }
                (true, _) => {
                    if let Some(pos) = open.iter().rposition(|o| o.0 == name) {
                        let (_, style, start, url) = open.remove(pos);
                        if let Some(style) = style {
                            let len = body.len() - start;
                            if len > 0 {
                                let (style, url) = match (style, url) {
                                    (Style::Link, u) if u.starts_with("https://matrix.to/#/@") => {
                                        (Style::Mention, u)
                                    }
                                    (s, u) => (s, u),
                                };
                                formats.push(Format {
                                    style: style as i32,
                                    start: start as u32,
                                    length: len as u32,
                                    url,
                                });
                            }
                        }
                    }
                }
            }
        } else {
            let end = rest.find('<').unwrap_or(rest.len());
            if skip_depth == 0 {
                body.extend(unescape(&rest[..end]).chars());
            }
            rest = &rest[end..];
        }
    }
    while body.last() == Some(&'\n') {
        body.pop();
    }
    let n = body.len() as u32;
    formats.retain(|f| f.start < n);
    for f in &mut formats {
        f.length = f.length.min(n - f.start);
    }
    formats.sort_by_key(|f| (f.start, f.style));
    Text {
        body: body.into_iter().collect(),
        formats,
    }
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let i = tag.find(&format!("{name}="))?;
    let v = &tag[i + name.len() + 1..];
    let (q, v) = match v.chars().next()? {
        '"' => ('"', &v[1..]),
        '\'' => ('\'', &v[1..]),
        _ => (' ', v),
    };
    Some(unescape(&v[..v.find(q).unwrap_or(v.len())]))
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(semi) = tail.find(';').filter(|&j| j <= 10) else {
            out.push('&');
            rest = &tail[1..];
            continue;
        };
        let ent = &tail[1..semi];
        let ch = match ent {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" | "#39" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            e if e.starts_with("#x") || e.starts_with("#X") => u32::from_str_radix(&e[2..], 16)
                .ok()
                .and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match ch {
            Some(c) => {
                out.push(c);
                rest = &tail[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Removes a legacy reply fallback (`> <@user> quoted` lines, then a blank line) from a body.
pub fn strip_reply_fallback(body: &str) -> &str {
    if !body.starts_with("> ") {
        return body;
    }
    match body.find("\n\n") {
        Some(i) if body[..i].lines().all(|l| l.starts_with('>')) => &body[i + 2..],
        _ => body,
    }
}

pub fn location_text(l: &Location) -> String {
    let mut s = String::from("Location");
    if !l.name.is_empty() {
        s.push_str(&format!(": {}", l.name));
    }
    if !l.address.is_empty() {
        s.push_str(&format!(", {}", l.address));
    }
    s.push_str(&format!(" ({:.6}, {:.6})", l.latitude, l.longitude));
    s
}

pub fn contact_text(c: &ContactCard) -> String {
    let mut parts = vec![format!(
        "Contact: {}",
        if c.display_name.is_empty() {
            "(no name)"
        } else {
            &c.display_name
        }
    )];
    if !c.phone_numbers.is_empty() {
        parts.push(format!("phone {}", c.phone_numbers.join(", ")));
    }
    if !c.emails.is_empty() {
        parts.push(format!("email {}", c.emails.join(", ")));
    }
    parts.join("; ")
}

/// Parses `geo:lat,lon[;...]`.
pub fn parse_geo_uri(uri: &str) -> Option<(f64, f64)> {
    let rest = uri.strip_prefix("geo:")?;
    let coords = rest.split(';').next()?;
    let mut it = coords.split(',');
    let lat = it.next()?.trim().parse().ok()?;
    let lon = it.next()?.trim().parse().ok()?;
    Some((lat, lon))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(style: Style, start: u32, length: u32) -> Format {
        Format {
            style: style as i32,
            start,
            length,
            url: String::new(),
        }
    }

    #[test]
    fn formats_render_nested_and_escaped() {
        let t = Text {
            body: "bold <and> both".into(),
            formats: vec![f(Style::Bold, 0, 10), f(Style::Italic, 5, 10)],
        };
        assert_eq!(
            text_to_html(&t).expect("html"),
            "<strong>bold </strong><strong><em>&lt;and&gt;</em></strong><em> both</em>"
        );
        assert_eq!(
            text_to_html(&Text {
                body: "plain".into(),
                formats: vec![]
            }),
            None
        );
    }

    #[test]
    fn html_parses_to_ranges_over_code_points() {
        let t = html_to_text(
            "héllo <b>wörld</b> <a href=\"https://x.org/?a=1&amp;b=2\">link</a><br>line <code>c</code>",
        );
        assert_eq!(t.body, "héllo wörld link\nline c");
        assert_eq!(t.formats[0], f(Style::Bold, 6, 5));
        assert_eq!(t.formats[1].style, Style::Link as i32);
        assert_eq!(t.formats[1].url, "https://x.org/?a=1&b=2");
        assert!(t.formats.iter().any(|x| *x == f(Style::Monospace, 22, 1)));
    }

    #[test]
    fn unsafe_links_and_reply_fallbacks_are_dropped() {
        let t = Text {
            body: "click".into(),
            formats: vec![Format {
                style: Style::Link as i32,
                start: 0,
                length: 5,
                url: "javascript:alert(1)".into(),
            }],
        };
        assert_eq!(text_to_html(&t), None);
        let t = html_to_text(
            "<mx-reply><blockquote>old <b>x</b></blockquote></mx-reply>new <script>bad</script>",
        );
        assert_eq!(t.body, "new bad");
        assert!(t.formats.is_empty());
        assert_eq!(
            strip_reply_fallback("> <@a:b> hi\n> there\n\nanswer"),
            "answer"
        );
        assert_eq!(
            strip_reply_fallback("> quote without end"),
            "> quote without end"
        );
    }

    #[test]
    fn geo_and_text_renderings() {
        assert_eq!(parse_geo_uri("geo:52.52,13.40;u=35"), Some((52.52, 13.40)));
        assert_eq!(parse_geo_uri("nope"), None);
        let c = ContactCard {
            display_name: "Ann".into(),
            phone_numbers: vec!["+1555".into()],
            emails: vec![],
            vcard: String::new(),
        };
        assert_eq!(contact_text(&c), "Contact: Ann; phone +1555");
    }
}
