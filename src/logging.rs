//! Log output: one line per event, whatever its fields hold.

use std::io::{self, Write};

/// Standard error, with line breaks inside an event escaped (`\n`, `\r`): a value that
/// carries one (a provider's error text, an odd `sub`, a client's parameter) cannot forge
/// log lines. JSON output escapes them itself; this covers the text format. Written to
/// anything but a terminal (where the gateway colours its own output), other control
/// characters and bidirectional overrides are escaped too (`\x1b`, `\u{202e}`): a client's
/// value cannot rewrite what a terminal or log viewer shows later.
pub struct OneLineStderr {
    pub controls: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for OneLineStderr {
    type Writer = OneLine<io::Stderr>;
    fn make_writer(&'a self) -> Self::Writer {
        OneLine {
            out: io::stderr(),
            controls: self.controls,
        }
    }
}

/// Writes each event (one `write` of the formatted line) with its inner line breaks (and,
/// with `controls`, other control characters) escaped.
pub struct OneLine<W> {
    pub out: W,
    pub controls: bool,
}

/// A bidirectional-text control (U+202A–U+202E, U+2066–U+2069) starting at `rest[0]`.
fn bidi_control(rest: &[u8]) -> Option<char> {
    match rest {
        [0xE2, 0x80, b @ 0xAA..=0xAE, ..] => char::from_u32(0x2000 + u32::from(*b - 0x80)),
        [0xE2, 0x81, b @ 0xA6..=0xA9, ..] => char::from_u32(0x2040 + u32::from(*b - 0x80)),
        _ => None,
    }
}

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (line, end) = match buf.strip_suffix(b"\n") {
            Some(line) => (line, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        let controls = self.controls;
        let special = |b: u8| {
            matches!(b, b'\n' | b'\r') || (controls && (b < 0x20 || b == 0x7f || b == 0xE2))
        };
        if !line.iter().any(|&b| special(b)) {
            self.out.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 8);
        let mut i = 0;
        while i < line.len() {
            let b = line[i];
            i += 1;
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                _ if !controls => out.push(b),
                b'\t' => out.extend_from_slice(b"\\t"),
                0..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
                0xE2 => match bidi_control(&line[i - 1..]) {
                    Some(c) => {
                        out.extend_from_slice(format!("\\u{{{:x}}}", u32::from(c)).as_bytes());
                        i += 2;
                    }
                    None => out.push(b),
                },
                _ => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.out.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inner_line_breaks_are_escaped() {
        for controls in [false, true] {
            let mut w = OneLine {
                out: Vec::new(),
                controls,
            };
            w.write_all(b"INFO error=a\n2026 INFO forged\r\n").unwrap();
            w.write_all(b"INFO plain\n").unwrap();
            assert_eq!(
                String::from_utf8(w.out).unwrap(),
                "INFO error=a\\n2026 INFO forged\\r\nINFO plain\n"
            );
        }
    }

    #[test]
    fn control_characters_and_bidi_overrides_are_escaped_off_a_terminal() {
        let line = "INFO error=\u{1b}[2J\u{7}x\ty \u{202e}gnp.exe \u{2069}é–\n";
        let mut w = OneLine {
            out: Vec::new(),
            controls: true,
        };
        w.write_all(line.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(w.out).unwrap(),
            "INFO error=\\x1b[2J\\x07x\\ty \\u{202e}gnp.exe \\u{2069}é–\n"
        );
        // On a terminal the gateway's own colours (ESC sequences) pass.
        let mut w = OneLine {
            out: Vec::new(),
            controls: false,
        };
        w.write_all(line.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(w.out).unwrap(), line);
    }
}
