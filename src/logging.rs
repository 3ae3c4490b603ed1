//! Log output: one line per event, whatever its fields hold.

use std::io::{self, Write};

/// Standard error, with line breaks inside an event escaped (`\n`, `\r`): a value that
/// carries one (a provider's error text, an odd `sub`, a client's parameter) cannot forge
/// log lines. JSON output escapes them itself; this covers the text format.
pub struct OneLineStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for OneLineStderr {
    type Writer = OneLine<io::Stderr>;
    fn make_writer(&'a self) -> Self::Writer {
        OneLine(io::stderr())
    }
}

/// Writes each event (one `write` of the formatted line) with its inner line breaks escaped.
pub struct OneLine<W>(pub W);

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (line, end) = match buf.strip_suffix(b"\n") {
            Some(line) => (line, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        if !line.iter().any(|b| matches!(b, b'\n' | b'\r')) {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 8);
        for &b in line {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                _ => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inner_line_breaks_are_escaped() {
        let mut w = OneLine(Vec::new());
        w.write_all(b"INFO error=a\n2026 INFO forged\r\n").unwrap();
        w.write_all(b"INFO plain\n").unwrap();
        assert_eq!(
            String::from_utf8(w.0).unwrap(),
            "INFO error=a\\n2026 INFO forged\\r\nINFO plain\n"
        );
    }
}
