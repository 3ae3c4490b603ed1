//! Log output: one line per event, whatever its fields hold, and a log reader that stops
//! reading costs log lines, never requests.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

/// Standard error, with line breaks inside an event escaped (`\n`, `\r`, and the other
/// characters that some reader takes for one: VT, FF, FS–RS, NEL, U+2028, U+2029): a value that
/// carries one (a provider's error text, an odd `sub`, a client's parameter) cannot forge
/// log lines. Written to anything but a terminal (where the gateway colours its own output),
/// other control characters (C0, DEL, C1) and bidirectional controls are escaped too (`\x1b`,
/// `\u{202e}`): a client's value cannot rewrite what a terminal or log viewer shows later. In
/// JSON lines the escapes are JSON's own (`\u202e`), so every line stays a JSON document.
/// Written through the process's queue once [`start_queue`] made one.
pub struct OneLineStderr {
    pub controls: bool,
    pub json: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for OneLineStderr {
    type Writer = OneLine<Stderr>;
    fn make_writer(&'a self) -> Self::Writer {
        OneLine {
            out: match QUEUE.get() {
                Some(q) => Stderr::Queued(q.clone()),
                None => Stderr::Direct(io::stderr()),
            },
            controls: self.controls,
            json: self.json,
        }
    }
}

/// What goes to the log writer thread.
pub enum Msg {
    Line(Vec<u8>),
    /// Answered once every line sent before it is written.
    Flush(mpsc::Sender<()>),
}

/// Lines the queue had no room for (its reader stalled): `log_lines_dropped_total`.
static DROPPED: AtomicU64 = AtomicU64::new(0);

pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// How many lines may wait for a stalled reader (a few MB at most).
const QUEUE_LINES: usize = 8192;

/// A queue to a thread that writes standard error, unless it is a regular file (or
/// `/dev/null`), which never waits for a reader. A pipe (a container runtime's log pipe, a
/// `| tee`) or a terminal can: written directly, a reader that stopped reading would stop
/// every request at its next log line, and `/healthz` with them. Queued, lines are written in
/// batches, and dropped (counted) while the queue is full.
pub fn start_queue() {
    if never_blocks(&io::stderr()) {
        return;
    }
    let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
    let started = std::thread::Builder::new()
        .name("portcullis-log".into())
        .spawn(move || write_queued(rx, io::stderr()));
    if started.is_ok() {
        let _ = QUEUE.set(tx);
    }
}

/// The process's queue, when [`start_queue`] made one.
static QUEUE: std::sync::OnceLock<SyncSender<Msg>> = std::sync::OnceLock::new();

#[cfg(unix)]
fn never_blocks(out: &io::Stderr) -> bool {
    use std::os::fd::AsFd;
    let Ok(fd) = out.as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd).metadata().is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_file()
            || m.file_type().is_char_device() && !io::IsTerminal::is_terminal(out)
    })
}

#[cfg(not(unix))]
fn never_blocks(_: &io::Stderr) -> bool {
    true
}

/// The writer thread: what is waiting goes out in one write (up to 64 KiB).
fn write_queued(rx: Receiver<Msg>, mut out: impl Write) {
    let mut batch = Vec::with_capacity(1 << 16);
    let mut flushed = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Line(line) => batch.extend_from_slice(&line),
                Msg::Flush(done) => flushed.push(done),
            }
            if batch.len() < 1 << 16 {
                next = rx.try_recv().ok();
            }
        }
        let _ = out.write_all(&batch);
        batch.clear();
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Waits (up to `within`) for the lines queued so far to be written: at exit.
pub fn flush(within: Duration) {
    let Some(q) = QUEUE.get() else { return };
    let (done, wait) = mpsc::channel();
    if q.try_send(Msg::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(within);
    }
}

/// Standard error itself, or the queue to its writer thread.
pub enum Stderr {
    Direct(io::Stderr),
    Queued(SyncSender<Msg>),
}

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stderr::Direct(out) => out.write(buf),
            Stderr::Queued(q) => {
                match q.try_send(Msg::Line(buf.to_vec())) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        DROPPED.fetch_add(1, Ordering::Relaxed);
                    }
                    // The writer thread is gone (it never panics; at exit): write directly.
                    Err(TrySendError::Disconnected(_)) => io::stderr().write_all(buf)?,
                }
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stderr::Direct(out) => out.flush(),
            Stderr::Queued(_) => Ok(()),
        }
    }
}

/// Writes each event (one `write` of the formatted line) with its inner line breaks (and,
/// with `controls`, other control characters) escaped.
pub struct OneLine<W> {
    pub out: W,
    pub controls: bool,
    pub json: bool,
}

/// What a character needs in a log line.
enum Kind {
    Plain,
    /// Ends a line for some reader: always escaped.
    LineBreak,
    /// A control or bidirectional control: escaped off a terminal.
    Control,
}

fn kind(c: char) -> Kind {
    match c {
        '\n'
        | '\r'
        | '\u{b}'
        | '\u{c}'
        | '\u{1c}'..='\u{1e}'
        | '\u{85}'
        | '\u{2028}'
        | '\u{2029}' => Kind::LineBreak,
        '\0'..='\u{1f}'
        | '\u{7f}'..='\u{9f}'
        | '\u{61c}'
        | '\u{200e}'
        | '\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}' => Kind::Control,
        _ => Kind::Plain,
    }
}

/// Bytes that start a character [`kind`] may escape: line breaks and the lead bytes of NEL
/// and U+2028/U+2029; with `controls`, ASCII controls and the lead bytes of U+0080–U+009F,
/// U+061C and U+2000–U+207F (a terminal's colour codes take no slow path).
fn may_escape(b: u8, controls: bool) -> bool {
    if controls {
        b < 0x20 || matches!(b, 0x7f | 0xC2 | 0xD8 | 0xE2)
    } else {
        matches!(b, b'\n' | b'\r' | 0x0b | 0x0c | 0x1c..=0x1e | 0xC2 | 0xE2)
    }
}

impl<W> OneLine<W> {
    /// `c` as an escape: JSON's own in JSON lines, Rust's in text.
    fn escape(&self, out: &mut String, c: char) {
        let _ = match c {
            '\n' => out.write_str("\\n"),
            '\r' => out.write_str("\\r"),
            '\t' => out.write_str("\\t"),
            _ if self.json => write!(out, "\\u{:04x}", u32::from(c)),
            '\0'..='\u{7f}' => write!(out, "\\x{:02x}", u32::from(c)),
            _ => write!(out, "\\u{{{:x}}}", u32::from(c)),
        };
    }
}

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (line, end) = match buf.strip_suffix(b"\n") {
            Some(line) => (line, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        if !line.iter().any(|&b| may_escape(b, self.controls)) {
            self.out.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = String::with_capacity(buf.len() + 16);
        // The formatter writes UTF-8; a byte that is not is escaped like a control.
        for chunk in line.utf8_chunks() {
            for c in chunk.valid().chars() {
                let escape = match kind(c) {
                    Kind::Plain => false,
                    Kind::LineBreak => true,
                    Kind::Control => self.controls,
                };
                if escape {
                    self.escape(&mut out, c);
                } else {
                    out.push(c);
                }
            }
            for &b in chunk.invalid() {
                let _ = match self.json {
                    true => out.write_str("\\ufffd"),
                    false => write!(out, "\\x{b:02x}"),
                };
            }
        }
        if !end.is_empty() {
            out.push('\n');
        }
        self.out.write_all(out.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// At most `max` bytes of `s`, cut at a character boundary: for values a client chooses,
/// which a log line must not repeat at any length.
pub fn at_most(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_lines_are_written_whole_and_in_order() {
        let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Shared(out.clone());
        let writer = std::thread::spawn(move || write_queued(rx, sink));
        for i in 0..1000 {
            tx.send(Msg::Line(format!("line {i}\n").into_bytes()))
                .unwrap();
        }
        let (done, wait) = mpsc::channel();
        tx.send(Msg::Flush(done)).unwrap();
        wait.recv_timeout(Duration::from_secs(10)).unwrap();
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let want: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, want);
        drop(tx);
        writer.join().unwrap();
    }

    #[test]
    fn inner_line_breaks_are_escaped() {
        for controls in [false, true] {
            let mut w = OneLine {
                out: Vec::new(),
                controls,
                json: false,
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
            json: false,
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
            json: false,
        };
        w.write_all(line.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(w.out).unwrap(), line);
    }

    fn escaped(line: &str, controls: bool, json: bool) -> String {
        let mut w = OneLine {
            out: Vec::new(),
            controls,
            json,
        };
        w.write_all(line.as_bytes()).unwrap();
        String::from_utf8(w.out).unwrap()
    }

    #[test]
    fn every_unicode_line_break_is_escaped_even_on_a_terminal() {
        // Python's splitlines, JavaScript and log shippers end lines at these too.
        let line = "INFO error=a\u{85}b\u{2028}c\u{2029}d\u{b}e\u{c}f\u{1c}g\u{1e}h é\n";
        for json in [false, true] {
            let out = escaped(line, false, json);
            assert_eq!(out.lines().count(), 1, "{out}");
            assert_eq!(out.split(['\u{85}', '\u{2028}', '\u{2029}']).count(), 1);
        }
        assert_eq!(
            escaped(line, false, false),
            "INFO error=a\\u{85}b\\u{2028}c\\u{2029}d\\x0be\\x0cf\\x1cg\\x1eh é\n"
        );
    }

    #[test]
    fn c1_controls_and_bidi_marks_are_escaped_off_a_terminal() {
        let line = "INFO error=\u{9b}2J \u{200f}x\u{61c}y\u{200e} \u{2066}z\u{2069} \u{a0}ok\n";
        assert_eq!(
            escaped(line, true, false),
            "INFO error=\\u{9b}2J \\u{200f}x\\u{61c}y\\u{200e} \\u{2066}z\\u{2069} \u{a0}ok\n"
        );
        assert_eq!(escaped(line, false, false), line);
    }

    #[test]
    fn json_lines_get_json_escapes_and_stay_json() {
        // What the JSON formatter leaves raw: DEL, C1, bidi and Unicode line breaks.
        let value = "a\u{7f}b\u{9b}c\u{202e}d\u{2028}e\u{85}f";
        let line = format!("{}\n", serde_json::json!({ "error": value }));
        let out = escaped(&line, true, true);
        assert_eq!(
            out,
            "{\"error\":\"a\\u007fb\\u009bc\\u202ed\\u2028e\\u0085f\"}\n"
        );
        let back: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(back["error"], value);
    }

    #[test]
    fn bytes_that_are_not_utf8_are_escaped_too() {
        let mut w = OneLine {
            out: Vec::new(),
            controls: false,
            json: false,
        };
        w.write_all(b"INFO error=\xff\nforged\n").unwrap();
        assert_eq!(
            String::from_utf8(w.out).unwrap(),
            "INFO error=\\xff\\nforged\n"
        );
    }
}
