//! RESP: replies ([`Reply`], encoded as RESP2 or, after `HELLO 3`, RESP3)
//! and commands (decoded from a
//! multibulk array or an inline line, as `PING\r\n` from HAProxy, nc or
//! telnet), with every size bounded: a bulk string, an array, an inline line
//! and a whole command. Input past a bound is a protocol error; the caller
//! answers it and closes the connection, as Redis does.

/// The bounds of one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest bulk string.
    pub max_bulk: usize,
    /// The most elements of a command array.
    pub max_array: usize,
    /// The longest inline command line.
    pub max_inline: usize,
    /// The most bytes of one command, all arguments together.
    pub max_command: usize,
}

/// Sentinel commands are short: a name, a subcommand, a group, a few channels.
pub const LIMITS: Limits = Limits { max_bulk: 64 * 1024, max_array: 1024, max_inline: 64 * 1024, max_command: 1 << 20 };

/// Input that is not RESP, or too large: the message Redis gives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    NilArray,
    Array(Vec<Reply>),
    /// A map: a RESP3 map, a flat field/value array in RESP2 (as Redis).
    Map(Vec<(Reply, Reply)>),
    /// An out-of-band message (Pub/Sub): a RESP3 push, an array in RESP2.
    Push(Vec<Reply>),
}

impl Reply {
    pub fn ok() -> Self {
        Reply::Simple("OK".into())
    }

    /// A bulk string.
    pub fn bulk(s: impl Into<String>) -> Self {
        Reply::Bulk(s.into().into_bytes())
    }

    /// An error reply; `text` starts with its code (`ERR ...`, `NOAUTH ...`).
    pub fn error(text: impl Into<String>) -> Self {
        Reply::Error(text.into())
    }

    /// A map of bulk strings, as Sentinel answers (a flat field/value array
    /// in RESP2).
    pub fn fields<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Reply::Map(pairs.into_iter().map(|(k, v)| (Reply::bulk(k), Reply::bulk(v))).collect())
    }

    /// Appends the encoding in protocol `proto` (2 or 3) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>, proto: u8) {
        let resp3 = proto >= 3;
        match self {
            Reply::Simple(s) => line(out, b'+', s.as_bytes()),
            // A reply line must not break the framing.
            Reply::Error(s) => line(out, b'-', s.replace(['\r', '\n'], " ").as_bytes()),
            Reply::Int(n) => line(out, b':', n.to_string().as_bytes()),
            Reply::Bulk(b) => {
                line(out, b'$', b.len().to_string().as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Nil | Reply::NilArray if resp3 => out.extend_from_slice(b"_\r\n"),
            Reply::Nil => out.extend_from_slice(b"$-1\r\n"),
            Reply::NilArray => out.extend_from_slice(b"*-1\r\n"),
            Reply::Array(items) | Reply::Push(items) => {
                let kind = if resp3 && matches!(self, Reply::Push(_)) { b'>' } else { b'*' };
                line(out, kind, items.len().to_string().as_bytes());
                for i in items {
                    i.encode(out, proto);
                }
            }
            Reply::Map(pairs) if resp3 => {
                line(out, b'%', pairs.len().to_string().as_bytes());
                for (k, v) in pairs {
                    k.encode(out, proto);
                    v.encode(out, proto);
                }
            }
            Reply::Map(pairs) => {
                line(out, b'*', (pairs.len() * 2).to_string().as_bytes());
                for (k, v) in pairs {
                    k.encode(out, proto);
                    v.encode(out, proto);
                }
            }
        }
    }
}

fn line(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
}

/// A command's arguments (the name first).
pub type Args = Vec<Vec<u8>>;

/// Decodes one command from the start of `buf`: `Ok(None)` while it is
/// incomplete (read more), else the arguments and the bytes used. An empty
/// inline line or an empty array decodes to no arguments.
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Option<(Args, usize)>, ProtocolError> {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => decode_array(buf, limits),
        Some(_) => decode_inline(buf, limits),
    }
}

/// The line at `from` (without its `\r\n`) and where the next one starts.
fn read_line<'a>(
    buf: &'a [u8],
    from: usize,
    max: usize,
    what: &str,
) -> Result<Option<(&'a [u8], usize)>, ProtocolError> {
    let rest = &buf[from..];
    match rest.windows(2).position(|w| w == b"\r\n") {
        Some(i) if i <= max => Ok(Some((&rest[..i], from + i + 2))),
        Some(_) => Err(ProtocolError(format!("too big {what}"))),
        None if rest.len() > max + 1 => Err(ProtocolError(format!("too big {what}"))),
        None => Ok(None),
    }
}

fn number(digits: &[u8]) -> Option<i64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn decode_array(buf: &[u8], limits: &Limits) -> Result<Option<(Args, usize)>, ProtocolError> {
    let Some((head, mut at)) = read_line(buf, 1, 20, "multibulk count")? else { return Ok(None) };
    let count = number(head).ok_or_else(|| ProtocolError("invalid multibulk length".into()))?;
    if count <= 0 {
        return Ok(Some((Vec::new(), at)));
    }
    if count as u64 > limits.max_array as u64 {
        return Err(ProtocolError("invalid multibulk length".into()));
    }
    let mut args = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let Some(&kind) = buf.get(at) else { return Ok(None) };
        if kind != b'$' {
            return Err(ProtocolError(format!("expected '$', got '{}'", char::from(kind).escape_default())));
        }
        let Some((len, start)) = read_line(buf, at + 1, 20, "bulk length")? else { return Ok(None) };
        let len = number(len)
            .filter(|n| (0..=limits.max_bulk as i64).contains(n))
            .ok_or_else(|| ProtocolError("invalid bulk length".into()))? as usize;
        if start + len > limits.max_command {
            return Err(ProtocolError("command too large".into()));
        }
        if buf.len() < start + len + 2 {
            return Ok(None);
        }
        if &buf[start + len..start + len + 2] != b"\r\n" {
            return Err(ProtocolError("bulk string not terminated by CRLF".into()));
        }
        args.push(buf[start..start + len].to_vec());
        at = start + len + 2;
    }
    Ok(Some((args, at)))
}

fn decode_inline(buf: &[u8], limits: &Limits) -> Result<Option<(Args, usize)>, ProtocolError> {
    let Some(end) = buf.iter().position(|b| *b == b'\n') else {
        if buf.len() > limits.max_inline {
            return Err(ProtocolError("too big inline request".into()));
        }
        return Ok(None);
    };
    if end > limits.max_inline {
        return Err(ProtocolError("too big inline request".into()));
    }
    let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let args = line.split(|b| b.is_ascii_whitespace()).filter(|a| !a.is_empty()).map(<[u8]>::to_vec).collect();
    Ok(Some((args, end + 1)))
}

/// Redis's glob match (`*`, `?`, `[abc]`, `[a-z]`, `[^a]`, `\x`), for
/// `PSUBSCRIBE` patterns. Linear backtracking to the last `*` only, so a
/// pattern of many stars costs no more than its length times the text's.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: (pattern after it, text position).
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            if pattern[p] == b'*' {
                star = Some((p + 1, t));
                p += 1;
                continue;
            }
            if let Some(next) = match_one(pattern, p, text[t]) {
                p = next;
                t += 1;
                continue;
            }
        }
        match star {
            Some((sp, st)) => {
                star = Some((sp, st + 1));
                p = sp;
                t = st + 1;
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

/// Whether the one element of `pattern` at `p` (not a `*`) matches `c`;
/// where the next element starts if it does.
fn match_one(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    match pattern[p] {
        b'?' => Some(p + 1),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c).then_some(p + 2),
        b'[' => {
            let mut i = p + 1;
            let negate = pattern.get(i) == Some(&b'^');
            if negate {
                i += 1;
            }
            let mut hit = false;
            let mut first = true;
            loop {
                match pattern.get(i) {
                    None => return None,
                    Some(b']') if !first => break,
                    Some(&lo)
                        if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|b| *b != b']') =>
                    {
                        hit |= (lo..=pattern[i + 2]).contains(&c);
                        i += 3;
                    }
                    Some(&b) => {
                        hit |= b == c;
                        i += 1;
                    }
                }
                first = false;
            }
            (hit != negate).then_some(i + 1)
        }
        b => (b == c).then_some(p + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(buf: &[u8]) -> Result<Option<(Vec<String>, usize)>, ProtocolError> {
        decode(buf, &LIMITS)
            .map(|o| o.map(|(a, n)| (a.into_iter().map(|x| String::from_utf8(x).unwrap()).collect(), n)))
    }

    #[test]
    fn multibulk_inline_and_partial_input() {
        assert_eq!(one(b"*1\r\n$4\r\nPING\r\n").unwrap(), Some((vec!["PING".into()], 14)));
        assert_eq!(one(b"*2\r\n$4\r\nPING\r\n$2\r\nhi").unwrap(), None, "incomplete");
        assert_eq!(one(b"*2\r\n$4\r\nPI").unwrap(), None);
        assert_eq!(one(b"PING\r\n").unwrap(), Some((vec!["PING".into()], 6)));
        assert_eq!(one(b"info  replication\n").unwrap(), Some((vec!["info".into(), "replication".into()], 18)));
        assert_eq!(one(b"\r\n").unwrap(), Some((vec![], 2)), "an empty line is skipped");
        assert_eq!(one(b"PIN").unwrap(), None);
        assert_eq!(one(b"*0\r\n").unwrap(), Some((vec![], 4)));
    }

    #[test]
    fn oversized_or_malformed_input_is_refused() {
        let e = |b: &[u8]| one(b).unwrap_err().to_string();
        assert_eq!(e(b"*1\r\n$70000\r\n"), "Protocol error: invalid bulk length");
        assert_eq!(e(b"*1\r\n$-5\r\n"), "Protocol error: invalid bulk length");
        assert_eq!(e(b"*5000\r\n"), "Protocol error: invalid multibulk length");
        assert_eq!(e(b"*x\r\n"), "Protocol error: invalid multibulk length");
        assert_eq!(e(b"*1\r\n+PING\r\n"), "Protocol error: expected '$', got '+'");
        assert_eq!(e(b"*1\r\n$4\r\nPINGxx"), "Protocol error: bulk string not terminated by CRLF");
        assert_eq!(e(&vec![b'a'; 70_000]), "Protocol error: too big inline request");
        let mut many = b"*20\r\n".to_vec();
        for _ in 0..20 {
            many.extend_from_slice(format!("$60000\r\n{}\r\n", "x".repeat(60_000)).as_bytes());
        }
        assert_eq!(e(&many), "Protocol error: command too large");
        assert_eq!(e(b"*99999999999999999999999\r\n"), "Protocol error: too big multibulk count");
    }

    #[test]
    fn replies_encode_as_resp2_and_resp3() {
        let replies = [
            Reply::Push(vec![Reply::bulk("subscribe"), Reply::bulk("+switch-master"), Reply::Int(1)]),
            Reply::Nil,
            Reply::NilArray,
            Reply::error("ERR bad\r\nthing"),
            Reply::ok(),
            Reply::fields([("ip", "10.0.0.1")]),
        ];
        let encode = |proto| {
            let mut out = Vec::new();
            for r in &replies {
                r.encode(&mut out, proto);
            }
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            encode(2),
            "*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n$-1\r\n*-1\r\n-ERR bad  thing\r\n+OK\r\n\
             *2\r\n$2\r\nip\r\n$8\r\n10.0.0.1\r\n"
        );
        assert_eq!(
            encode(3),
            ">3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n_\r\n_\r\n-ERR bad  thing\r\n+OK\r\n\
             %1\r\n$2\r\nip\r\n$8\r\n10.0.0.1\r\n"
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"*", b"+switch-master"));
        assert!(glob_match(b"+s*", b"+sdown"));
        assert!(!glob_match(b"+s*", b"-sdown"));
        assert!(glob_match(b"[+-]odown", b"-odown"));
        assert!(glob_match(b"?sdown", b"+sdown"));
        assert!(glob_match(b"[^-]sdown", b"+sdown") && !glob_match(b"[^-]sdown", b"-sdown"));
        assert!(glob_match(b"\\*", b"*") && !glob_match(b"\\*", b"x"));
        assert!(glob_match(b"*a*b*", b"xxaxxbxx") && !glob_match(b"*a*b*", b"xxbxxaxx"));
        let stars = vec![b'*'; 10_000];
        assert!(glob_match(&stars, b"+switch-master"), "many stars, quickly");
        let mut no = stars.clone();
        no.push(b'z');
        assert!(!glob_match(&no, b"+switch-master"));
    }
}
