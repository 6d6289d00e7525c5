//! Message conversion between Matrix content and the interop content schema: formatting (Matrix
//! HTML ↔ styled ranges over code points), with everything else escaped, and plain-text
//! renderings of content Matrix has no type for.

use super::model::{ContactCard, Format, Location, Style, Text};

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
    match f.style {
        Style::Bold => "<strong>".into(),
        Style::Italic => "<em>".into(),
        Style::Strikethrough => "<del>".into(),
        Style::Monospace => "<code>".into(),
        Style::CodeBlock => "<pre><code>".into(),
        Style::Quote => "<blockquote>".into(),
        Style::Spoiler => "<span data-mx-spoiler>".into(),
        Style::Link if is_safe_url(&f.url) => format!("<a href=\"{}\">", escape(&f.url)),
        Style::Link | Style::Mention => String::new(),
    }
}

fn close_tag(f: &Format) -> &'static str {
    match f.style {
        Style::Bold => "</strong>",
        Style::Italic => "</em>",
        Style::Strikethrough => "</del>",
        Style::Monospace => "</code>",
        Style::CodeBlock => "</code></pre>",
        Style::Quote => "</blockquote>",
        Style::Spoiler => "</span>",
        Style::Link if is_safe_url(&f.url) => "</a>",
        Style::Link | Style::Mention => "",
    }
}

fn is_safe_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    ["https://", "http://", "mailto:", "matrix:", "tel:"]
        .iter()
        .any(|p| lower.starts_with(p))
}

/// At most this many format ranges of one message are rendered; the rest are dropped. Real
/// clients send a handful; the cap keeps a hostile message from costing more than a bounded
/// amount of work.
pub const MAX_FORMATS: usize = 512;
/// Rendered HTML longer than this is not sent: the message goes as plain text instead. Matrix
/// events are limited to 64 KiB (and Megolm adds a third), so it leaves room for the body.
pub const MAX_HTML_BYTES: usize = 16 * 1024;
/// Links with a longer target are not rendered as links.
const MAX_URL_BYTES: usize = 2048;
/// Tags nested deeper than this in Matrix HTML are ignored (their text is kept).
const MAX_HTML_DEPTH: usize = 64;
/// A message body longer than this is cut (at a character boundary) with a note saying so.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// The first `max_chars` characters of `body`, with `…` when there was more.
pub fn preview(body: &str, max_chars: usize) -> std::borrow::Cow<'_, str> {
    match body.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &body[..i]).into(),
        None => body.into(),
    }
}

/// The body as it can go into one Matrix event: cut to [`MAX_BODY_BYTES`] with a note when longer.
pub fn bounded_body(body: &str) -> std::borrow::Cow<'_, str> {
    if body.len() <= MAX_BODY_BYTES {
        return body.into();
    }
    let mut cut = MAX_BODY_BYTES;
    while !body.is_char_boundary(cut) {
        cut -= 1;
    }
    let rest = body[cut..].chars().count();
    format!("{}… [message cut: {rest} more characters]", &body[..cut]).into()
}

/// Renders interop text as Matrix HTML, or `None` when it has no formatting (or when the HTML
/// would be over [`MAX_HTML_BYTES`]). Overlapping ranges are closed and reopened at each
/// boundary, so the result always nests correctly. The work is bounded by the body's length,
/// the number of ranges (at most [`MAX_FORMATS`]) and the output's size limit.
pub fn text_to_html(t: &Text) -> Option<String> {
    // Byte offset of every code point, and of the end.
    let offsets: Vec<usize> = t
        .body
        .char_indices()
        .map(|(i, _)| i)
        .chain(std::iter::once(t.body.len()))
        .collect();
    let n = offsets.len() - 1;
    // (start, end) in code points, clamped to the body; u64 so `start + length` cannot overflow.
    let mut formats: Vec<(usize, usize, &Format)> = t
        .formats
        .iter()
        .filter(|f| f.length > 0 && (f.start as usize) < n && has_tag(f))
        .take(MAX_FORMATS)
        .map(|f| {
            let end = (u64::from(f.start) + u64::from(f.length)).min(n as u64) as usize;
            (f.start as usize, end, f)
        })
        .collect();
    if formats.is_empty() {
        return None;
    }
    formats.sort_by_key(|&(start, end, _)| (start, std::cmp::Reverse(end)));
    let mut bounds: Vec<usize> = formats.iter().flat_map(|&(s, e, _)| [s, e]).collect();
    bounds.extend([0, n]);
    bounds.sort_unstable();
    bounds.dedup();
    let mut html = String::new();
    // Formats covering the current segment, in the order they open.
    let mut active: Vec<usize> = Vec::new();
    let mut next = 0;
    for w in bounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        active.retain(|&i| formats[i].1 > a);
        while next < formats.len() && formats[next].0 <= a {
            if formats[next].1 > a {
                active.push(next);
            }
            next += 1;
        }
        for &i in &active {
            html.push_str(&open_tag(formats[i].2));
            if html.len() > MAX_HTML_BYTES {
                return None;
            }
        }
        html.push_str(&escape(&t.body[offsets[a]..offsets[b]]));
        for &i in active.iter().rev() {
            html.push_str(close_tag(formats[i].2));
        }
        if html.len() > MAX_HTML_BYTES {
            return None;
        }
    }
    Some(html)
}

fn has_tag(f: &Format) -> bool {
    match f.style {
        Style::Link => f.url.len() <= MAX_URL_BYTES && is_safe_url(&f.url),
        Style::Mention => false,
        _ => true,
    }
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
                    let void = tag.ends_with('/')
                        || matches!(name.as_str(), "img" | "hr" | "wbr" | "input" | "meta");
                    if !void && open.len() < MAX_HTML_DEPTH {
                        open.push((name, style, body.len(), url));
                    }
                }
                (true, _) => {
                    if let Some(pos) = open.iter().rposition(|o| o.0 == name) {
                        let (_, style, start, url) = open.remove(pos);
                        if let Some(style) = style {
                            let len = body.len() - start;
                            if len > 0 && formats.len() < MAX_FORMATS {
                                let (style, url) = match (style, url) {
                                    (Style::Link, u) if u.starts_with("https://matrix.to/#/@") => {
                                        (Style::Mention, u)
                                    }
                                    (s, u) => (s, u),
                                };
                                formats.push(Format {
                                    style,
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
            style,
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

    /// Overlapping ranges used to cost (segments × ranges) work and output: 2,000 of them over
    /// 30 KB made 70 MB of HTML. Now the output is bounded and no range arithmetic overflows.
    #[test]
    fn formatting_bombs_render_bounded() {
        let body = "x".repeat(30_000);
        let formats = (0..2_000).map(|i| f(Style::Bold, i * 7, 20_000)).collect();
        let html = text_to_html(&Text { body, formats });
        assert!(html.is_none_or(|h| h.len() <= MAX_HTML_BYTES));

        // The issue's figure: 300 KB with 20,000 overlapping ranges (render then cut).
        let body = "y".repeat(300_000);
        let formats: Vec<Format> = (0..20_000)
            .map(|i| f(Style::Bold, i * 13, 250_000))
            .collect();
        let t = Text { body, formats };
        assert!(text_to_html(&t).is_none_or(|h| h.len() <= MAX_HTML_BYTES));
        assert!(bounded_body(&t.body).len() < MAX_BODY_BYTES + 100);

        // start + length past u32::MAX, and ranges starting past the end.
        let t = Text {
            body: "overflow".into(),
            formats: vec![
                f(Style::Italic, 2, u32::MAX),
                f(Style::Bold, u32::MAX, u32::MAX),
                f(Style::Strikethrough, u32::MAX - 1, 5),
            ],
        };
        assert_eq!(text_to_html(&t).as_deref(), Some("ov<em>erflow</em>"));

        // A few ranges over a short text still render in full.
        let t = Text {
            body: "a".repeat(100),
            formats: (0..MAX_FORMATS as u32 + 50)
                .map(|i| f(Style::Bold, i % 100, 1))
                .collect(),
        };
        assert!(text_to_html(&t).is_some());
    }

    #[test]
    fn deep_matrix_html_is_bounded() {
        let html = format!(
            "{}text{}",
            "<b><i>".repeat(20_000),
            "</i></b>".repeat(20_000)
        );
        let t = html_to_text(&html);
        assert_eq!(t.body, "text");
        assert!(t.formats.len() <= MAX_FORMATS);
        let many = "<b>x</b>".repeat(5_000);
        assert!(html_to_text(&many).formats.len() <= MAX_FORMATS);
        // Void elements do not use up the nesting depth.
        let t = html_to_text(&format!("{}<b>bold</b>", "<img src=\"x\">".repeat(100)));
        assert_eq!(t.formats, vec![f(Style::Bold, 0, 4)]);
    }

    #[test]
    fn long_bodies_are_cut_with_a_note() {
        let short = "é".repeat(10);
        assert_eq!(bounded_body(&short), short.as_str());
        let long = "é".repeat(MAX_BODY_BYTES);
        let cut = bounded_body(&long);
        assert!(cut.len() <= MAX_BODY_BYTES + 64);
        assert!(cut.ends_with("more characters]"));
    }

    #[test]
    fn html_parses_to_ranges_over_code_points() {
        let t = html_to_text(
            "héllo <b>wörld</b> <a href=\"https://x.org/?a=1&amp;b=2\">link</a><br>line <code>c</code>",
        );
        assert_eq!(t.body, "héllo wörld link\nline c");
        assert_eq!(t.formats[0], f(Style::Bold, 6, 5));
        assert_eq!(t.formats[1].style, Style::Link);
        assert_eq!(t.formats[1].url, "https://x.org/?a=1&b=2");
        assert!(t.formats.iter().any(|x| *x == f(Style::Monospace, 22, 1)));
    }

    #[test]
    fn unsafe_links_and_reply_fallbacks_are_dropped() {
        let t = Text {
            body: "click".into(),
            formats: vec![Format {
                style: Style::Link,
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
