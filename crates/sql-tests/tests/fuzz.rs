//! SQL fuzzing campaign: seeded, bounded in time. Generated inputs (random Unicode with control
//! characters and invalid-looking sequences, empty and whitespace texts, 1 byte to many MB,
//! arrays with NULLs and thousands of elements, bad tasks and dims, NULL arguments, settings)
//! go through embed(), both embed_batch() forms, embeddinggemma_info()/stats()/check_columns()
//! and the triggers, from several concurrent sessions of an ordinary role while another thread
//! cancels them at random moments and statement_timeout changes at random.
//!
//! Passes when no backend crashed (no lost connection, the postmaster never restarted, no
//! crash in the server log, connections outside the campaign still work), every success has
//! the right shape (dims, unit norm, rows), and every error carries a SQLSTATE and a HINT —
//! except the errors PostgreSQL itself raises before or around our code (listed in
//! `allowed_without_hint`).
//!
//! Settings (environment):
//!   EMBEDDINGGEMMA_FUZZ_INPUTS   inputs to try (default 1500: the CI version)
//!   EMBEDDINGGEMMA_FUZZ_SEED     campaign seed (default 20240901; case k is a function of it)
//!   EMBEDDINGGEMMA_FUZZ_SECONDS  time bound: no new input after it (default 150)
//!   EMBEDDINGGEMMA_FUZZ_MAX_MB   largest text in MB (default 4; the full campaign uses 50)
//!   EMBEDDINGGEMMA_FUZZ_SESSIONS concurrent sessions (default 3)
//!   EMBEDDINGGEMMA_FUZZ_CASE     run only case k, alone and without cancels (reproduction)
//! bench/fuzz-sql runs the full campaign (≥ 10,000 inputs, 50 MB texts) on its own server.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use embeddinggemma_sql_tests::*;
use postgres::types::ToSql;
use postgres::{CancelToken, Client, NoTls};

const ROLE: &str = "eg_fuzz";
/// statement_timeout of the fuzz sessions, unless a case picks another.
const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// Texts at least this long run one at a time (memory of the shared machine).
const HUGE: usize = 8 << 20;

// ---------------------------------------------------------------------------------------------
// Seeded PRNG (SplitMix64).

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn for_case(seed: u64, case: u64) -> Rng {
        let mut r = Rng(seed ^ case.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in lo..=hi.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.next() as usize % xs.len()]
    }
    /// Log-uniform in lo..=hi (lo ≥ 1).
    fn log_range(&mut self, lo: u64, hi: u64) -> u64 {
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        let x = a + (b - a) * ((self.next() >> 11) as f64 / (1u64 << 53) as f64);
        (x.exp() as u64).clamp(lo, hi)
    }
}

// ---------------------------------------------------------------------------------------------
// Generated texts.

const WHITESPACE: &[char] = &[
    ' ', '\t', '\n', '\r', '\u{0B}', '\u{0C}', '\u{85}', '\u{A0}', '\u{1680}', '\u{2000}', '\u{2003}', '\u{2009}',
    '\u{200A}', '\u{200B}', '\u{2028}', '\u{2029}', '\u{202F}', '\u{205F}', '\u{3000}', '\u{FEFF}',
];
const SPECIAL: &[char] = &[
    '\u{FFFD}',
    '\u{FFFE}',
    '\u{FFFF}',
    '\u{FDD0}',
    '\u{E000}',
    '\u{F8FF}',
    '\u{10FFFF}',
    '\u{1FFFE}',
    '\u{E0001}',
    '\u{E007F}',
    '\u{2060}',
    '\u{00AD}',
    '\u{034F}',
    '\u{180E}',
    '\u{FFF9}',
    '\u{1D173}',
];
/// Strings that look like escapes, invalid encodings or the tokenizer's special tokens.
const TRICKY: &[&str] = &[
    "\\x00",
    "\\xff\\xfe",
    "\\uD800",
    "\\uDFFF",
    "%00",
    "%C0%80",
    "&#0;",
    "&#xD800;",
    "\u{FFFD}\u{FFFD}",
    "\u{C0}\u{80}",
    "<bos>",
    "<eos>",
    "<pad>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "[CLS]",
    "</s>",
    "<|endoftext|>",
    "\u{1b}[31m",
    "\u{1b}]0;x\u{7}",
    "\r\n",
    "\u{202E}gnp.exe",
    "e\u{301}\u{301}\u{301}",
    "\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}",
    "\u{1F1FA}\u{1F1F8}",
    "\u{1F44D}\u{1F3FD}",
    "task: search result | query: ",
    "title: none | text: ",
    "'; DROP TABLE x; --",
    "$$",
    "\\",
];

fn range_char(rng: &mut Rng, lo: u32, hi: u32) -> char {
    char::from_u32(rng.range(lo as u64, hi as u64) as u32).unwrap_or('\u{FFFD}')
}

fn gen_char(rng: &mut Rng, class: u64) -> char {
    match class {
        0..=2 => range_char(rng, 0x20, 0x7E),
        3 => match rng.range(0, 2) {
            0 => range_char(rng, 0x01, 0x1F),
            1 => '\u{7F}',
            _ => range_char(rng, 0x80, 0x9F),
        },
        4 => *rng.pick(WHITESPACE),
        5 => match rng.range(0, 2) {
            0 => range_char(rng, 0x300, 0x36F),
            1 => range_char(rng, 0x1AB0, 0x1ABE),
            _ => range_char(rng, 0x20D0, 0x20F0),
        },
        6 => match rng.range(0, 3) {
            0 => range_char(rng, 0x5D0, 0x5EA),
            1 => range_char(rng, 0x620, 0x64A),
            2 => *rng.pick(&[
                '\u{200E}', '\u{200F}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}',
                '\u{2069}',
            ]),
            _ => range_char(rng, 0xFB50, 0xFDFF),
        },
        7 => match rng.range(0, 4) {
            0 | 1 => range_char(rng, 0x1F300, 0x1FAFF),
            2 => *rng.pick(&['\u{200D}', '\u{FE0F}', '\u{FE0E}', '\u{20E3}']),
            3 => range_char(rng, 0x1F3FB, 0x1F3FF),
            _ => range_char(rng, 0x1F1E6, 0x1F1FF),
        },
        8 => match rng.range(0, 2) {
            0 => range_char(rng, 0x4E00, 0x9FFF),
            1 => range_char(rng, 0xAC00, 0xD7A3),
            _ => range_char(rng, 0x3040, 0x30FF),
        },
        9 => *rng.pick(SPECIAL),
        // Any Unicode scalar value but NUL (a PostgreSQL text cannot hold one).
        _ => loop {
            if let Some(c) = char::from_u32(rng.range(1, 0x10FFFF) as u32) {
                break c;
            }
        },
    }
}

/// Appends generated text to `s` until it holds at least `bytes` bytes.
fn fill(rng: &mut Rng, s: &mut String, bytes: usize) {
    // A style per text: all classes mixed, one class, words, tricky strings.
    let style = rng.range(0, 5);
    let class = rng.range(0, 10);
    while s.len() < bytes {
        match style {
            0 | 1 => {
                let c = rng.range(0, 10);
                s.push(gen_char(rng, c))
            }
            2 => s.push(gen_char(rng, class)),
            3 => {
                s.push_str(rng.pick::<&str>(&[
                    "the",
                    "quick",
                    "brown",
                    "fox",
                    "Postgres",
                    "vector",
                    "東京",
                    "Ünïcödé",
                    "🦊",
                    "x",
                ]));
                s.push(*rng.pick(WHITESPACE));
            }
            4 => s.push_str(rng.pick::<&str>(TRICKY)),
            _ => {
                s.push_str(rng.pick::<&str>(TRICKY));
                let c = rng.range(0, 10);
                s.push(gen_char(rng, c));
            }
        }
    }
}

/// A text of about `bytes` bytes (exactly, for ASCII-only pieces; never more than a char over).
fn text_of(rng: &mut Rng, bytes: usize) -> String {
    if bytes == 0 {
        return String::new();
    }
    if rng.chance(0.08) {
        // Whitespace only.
        let mut s = String::with_capacity(bytes + 4);
        while s.len() < bytes {
            s.push(*rng.pick(WHITESPACE));
        }
        return s;
    }
    const CHUNK: usize = 64 << 10;
    let mut s = String::with_capacity(bytes + 4);
    if bytes <= CHUNK {
        fill(rng, &mut s, bytes);
    } else {
        // Big texts repeat a random 64 KB chunk (with a random piece between copies).
        let mut chunk = String::new();
        fill(rng, &mut chunk, CHUNK);
        while s.len() < bytes {
            s.push_str(&chunk);
            let c = rng.range(0, 10);
            s.push(gen_char(rng, c));
        }
        let mut cut = bytes;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut.max(1));
    }
    s
}

/// A text size: mostly short, some long, a rare huge one (≤ max).
fn text_size(rng: &mut Rng, max: usize) -> usize {
    let p = rng.range(0, 9999);
    let max = max as u64;
    (match p {
        0..=799 => 0,
        800..=1299 => 1,
        1300..=5799 => rng.range(2, 64),
        5800..=8299 => rng.range(65, 2048),
        8300..=9499 => rng.log_range(2049, 64 << 10),
        9500..=9974 => rng.log_range(64 << 10, (1 << 20).min(max)),
        _ => rng.log_range((1 << 20).min(max), max),
    }) as usize
}

fn element_size(rng: &mut Rng) -> usize {
    match rng.range(0, 99) {
        0..=9 => 0,
        10..=74 => rng.range(1, 48) as usize,
        75..=97 => rng.range(49, 1024) as usize,
        _ => rng.log_range(1025, 64 << 10) as usize,
    }
}

fn text_array(rng: &mut Rng, big: bool) -> Vec<Option<String>> {
    let n = match rng.range(0, 9) {
        0 => 0,
        1..=5 => rng.range(1, 16),
        6..=8 => rng.range(17, 500),
        _ => rng.range(501, if big { 12_000 } else { 3_000 }),
    } as usize;
    let null_rate = *rng.pick(&[0.0, 0.0, 0.1, 0.5, 1.0]);
    // Thousands of elements stay short: an array's cost is bounded by its bytes.
    let budget_each = if n > 500 { 64 } else { usize::MAX };
    (0..n)
        .map(|_| {
            if rng.chance(null_rate) {
                None
            } else {
                let size = element_size(rng).min(budget_each);
                Some(text_of(rng, size))
            }
        })
        .collect()
}

/// A short text for task names, column names.
fn short_text(rng: &mut Rng) -> String {
    let n = rng.range(0, 24) as usize;
    text_of(rng, n)
}

// ---------------------------------------------------------------------------------------------
// Cases.

struct Facts {
    dims: Vec<i32>,
    tasks: Vec<String>,
}

fn gen_task(rng: &mut Rng, facts: &Facts) -> Option<String> {
    match rng.range(0, 99) {
        0..=64 => Some(rng.pick(&facts.tasks).clone()),
        65..=69 => None,
        70..=74 => Some(String::new()),
        75..=79 => Some(rng.pick(&facts.tasks).to_uppercase()),
        80..=84 => Some(format!(" {}", rng.pick(&facts.tasks))),
        85..=87 => {
            let n = rng.log_range(1000, 1 << 20) as usize;
            Some(text_of(rng, n))
        }
        _ => Some(short_text(rng)),
    }
}

fn gen_dim(rng: &mut Rng, facts: &Facts) -> Option<i32> {
    match rng.range(0, 99) {
        0..=64 => Some(*rng.pick(&facts.dims)),
        65..=69 => None,
        _ => Some(*rng.pick(&[0, -1, 1, 769, 768, 512, 256, 128, 47, 49, i32::MAX, i32::MIN, 1 << 20])),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Embed,
    EmbedDefaults,
    Batch,
    BatchIds,
    Expr,
    Info,
    CheckColumns,
    Setting,
    Trigger,
    Reconnect,
}

enum Param {
    Text(Option<String>),
    Int(Option<i32>),
    Long(Option<i64>),
    Texts(Option<Vec<Option<String>>>),
    Longs(Option<Vec<Option<i64>>>),
    Bytes(Vec<u8>),
}

impl Param {
    fn sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Text(v) => v,
            Param::Int(v) => v,
            Param::Long(v) => v,
            Param::Texts(v) => v,
            Param::Longs(v) => v,
            Param::Bytes(v) => v,
        }
    }
    fn describe(&self) -> String {
        fn text(s: &str) -> String {
            if s.len() <= 60 {
                format!("{s:?}")
            } else {
                let mut cut = 40;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                format!("{:?}… ({} bytes)", &s[..cut], s.len())
            }
        }
        match self {
            Param::Text(None) | Param::Int(None) | Param::Long(None) | Param::Texts(None) | Param::Longs(None) => {
                "NULL".into()
            }
            Param::Text(Some(s)) => text(s),
            Param::Int(Some(v)) => v.to_string(),
            Param::Long(Some(v)) => v.to_string(),
            Param::Texts(Some(a)) => {
                let nulls = a.iter().filter(|x| x.is_none()).count();
                let bytes: usize = a.iter().flatten().map(String::len).sum();
                let first = a.iter().flatten().next().map(|s| text(s)).unwrap_or_default();
                format!("text[{}] ({nulls} NULL, {bytes} bytes, first {first})", a.len())
            }
            Param::Longs(Some(a)) => format!("bigint[{}] ({} NULL)", a.len(), a.iter().filter(|x| x.is_none()).count()),
            Param::Bytes(b) => format!("bytea {:02x?}{}", &b[..b.len().min(16)], if b.len() > 16 { "…" } else { "" }),
        }
    }
}

/// What a success must look like.
enum Expect {
    /// One row, one vector column (or NULL) of `dim` values.
    Vector(Option<i32>),
    /// Rows (ord or id, vector) matching `inputs` in order; `ids` for the keyed form.
    Batch { dim: Option<i32>, inputs: Vec<bool>, ids: Option<Vec<Option<i64>>> },
    /// Rows of vectors of `dim` (or NULL), count unchecked.
    Vectors(Option<i32>),
    /// Anything (info, stats, settings, check_columns).
    Anything,
}

struct Case {
    index: u64,
    kind: Kind,
    sql: String,
    params: Vec<Param>,
    expect: Expect,
    timeout_ms: u64,
    /// The text bytes it sends or makes, to run huge ones one at a time.
    bytes: usize,
}

impl Case {
    fn describe(&self) -> String {
        let mut d =
            format!("case #{} {:?} (statement_timeout {} ms): {}", self.index, self.kind, self.timeout_ms, self.sql);
        for (i, p) in self.params.iter().enumerate() {
            let _ = write!(d, "\n    ${} = {}", i + 1, p.describe());
        }
        d
    }
}

struct Config {
    inputs: u64,
    seed: u64,
    seconds: u64,
    max_bytes: usize,
    sessions: usize,
    only: Option<u64>,
}

impl Config {
    fn from_env() -> Config {
        let var = |name: &str, default: u64| -> u64 {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
                .unwrap_or(default)
        };
        Config {
            inputs: var("EMBEDDINGGEMMA_FUZZ_INPUTS", 1500),
            seed: var("EMBEDDINGGEMMA_FUZZ_SEED", 20240901),
            seconds: var("EMBEDDINGGEMMA_FUZZ_SECONDS", 150),
            max_bytes: (var("EMBEDDINGGEMMA_FUZZ_MAX_MB", 4) as usize) << 20,
            sessions: var("EMBEDDINGGEMMA_FUZZ_SESSIONS", 3).max(1) as usize,
            only: std::env::var("EMBEDDINGGEMMA_FUZZ_CASE").ok().map(|v| v.parse().expect("EMBEDDINGGEMMA_FUZZ_CASE")),
        }
    }
}

/// Case `index` of the campaign: a function of the seed and the index only. The first cases
/// are fixed edge cases (each size extreme at least once), then everything is drawn.
fn make_case(cfg: &Config, facts: &Facts, index: u64) -> Case {
    let mut rng = Rng::for_case(cfg.seed, index);
    let dim0 = facts.dims[0];
    let valid = |s: &str| Param::Text(Some(s.to_string()));
    let case = |kind, sql: &str, params: Vec<Param>, expect| Case {
        index,
        kind,
        sql: sql.to_string(),
        params,
        expect,
        timeout_ms: DEFAULT_TIMEOUT_MS,
        bytes: 0,
    };
    const EMBED: &str = "SELECT embed($1::text, $2::text, $3::int)::real[]";
    let fixed = match index {
        0 => Some(case(
            Kind::Embed,
            EMBED,
            vec![valid(""), valid("query"), Param::Int(Some(dim0))],
            Expect::Vector(Some(dim0)),
        )),
        1 => Some(case(
            Kind::Embed,
            EMBED,
            vec![valid("a"), valid("none"), Param::Int(Some(dim0))],
            Expect::Vector(Some(dim0)),
        )),
        2 => Some(case(
            Kind::Embed,
            EMBED,
            vec![valid(" \t\n\u{3000}"), valid("document"), Param::Int(Some(dim0))],
            Expect::Vector(Some(dim0)),
        )),
        // A NUL inside a text parameter: PostgreSQL refuses it when it reads the parameter.
        3 => Some(case(
            Kind::Embed,
            EMBED,
            vec![valid("a\0b"), valid("query"), Param::Int(Some(dim0))],
            Expect::Vector(Some(dim0)),
        )),
        4 => Some(case(
            Kind::Expr,
            "SELECT embed(convert_from('\\x610062'::bytea, 'UTF8'))::real[]",
            vec![],
            Expect::Vector(None),
        )),
        5 => Some(case(Kind::Expr, "SELECT embed(chr(0))::real[]", vec![], Expect::Vector(None))),
        6 => Some(case(
            Kind::Embed,
            EMBED,
            vec![Param::Text(None), Param::Text(None), Param::Int(None)],
            Expect::Vector(None),
        )),
        7 | 8 => {
            // The largest text, once through embed() and once in an array with NULLs.
            let text = text_of(&mut rng, cfg.max_bytes);
            let bytes = text.len();
            let mut c = if index == 7 {
                case(
                    Kind::Embed,
                    EMBED,
                    vec![Param::Text(Some(text)), valid("query"), Param::Int(Some(dim0))],
                    Expect::Vector(Some(dim0)),
                )
            } else {
                case(
                    Kind::Batch,
                    "SELECT ord, embedding::real[] FROM embed_batch($1::text[], $2::text, $3::int)",
                    vec![
                        Param::Texts(Some(vec![None, Some(text), Some("x".into()), None])),
                        valid("document"),
                        Param::Int(Some(dim0)),
                    ],
                    Expect::Batch { dim: Some(dim0), inputs: vec![false, true, true, false], ids: None },
                )
            };
            c.bytes = bytes;
            c.timeout_ms = 2 * DEFAULT_TIMEOUT_MS;
            Some(c)
        }
        _ => None,
    };
    if let Some(c) = fixed {
        return c;
    }

    let mut c = match rng.range(0, 99) {
        0..=29 => {
            let size = text_size(&mut rng, cfg.max_bytes);
            let text = if rng.chance(0.03) { None } else { Some(text_of(&mut rng, size)) };
            let (task, dim) = (gen_task(&mut rng, facts), gen_dim(&mut rng, facts));
            let mut c = case(
                Kind::Embed,
                EMBED,
                vec![Param::Text(text), Param::Text(task), Param::Int(dim)],
                Expect::Vector(dim),
            );
            c.bytes = size;
            c
        }
        30..=37 => {
            let size = text_size(&mut rng, cfg.max_bytes.min(1 << 20));
            let text = Param::Text(Some(text_of(&mut rng, size)));
            let mut c = if rng.chance(0.5) {
                case(Kind::EmbedDefaults, "SELECT embed($1::text)::real[]", vec![text], Expect::Vector(Some(768)))
            } else {
                let task = gen_task(&mut rng, facts);
                case(
                    Kind::EmbedDefaults,
                    "SELECT embed($1::text, $2::text)::real[]",
                    vec![text, Param::Text(task)],
                    Expect::Vector(Some(768)),
                )
            };
            c.bytes = size;
            c
        }
        38..=55 => {
            let big = cfg.max_bytes > (8 << 20);
            let inputs = if rng.chance(0.03) { None } else { Some(text_array(&mut rng, big)) };
            let (task, dim) = (gen_task(&mut rng, facts), gen_dim(&mut rng, facts));
            // STRICT: a NULL argument gives no rows.
            let strict_null = inputs.is_none() || task.is_none() || dim.is_none();
            let shape = inputs
                .as_ref()
                .filter(|_| !strict_null)
                .map(|a| a.iter().map(Option::is_some).collect())
                .unwrap_or_default();
            let bytes = inputs.iter().flatten().flatten().map(String::len).sum();
            let mut c = case(
                Kind::Batch,
                "SELECT ord, embedding::real[] FROM embed_batch($1::text[], $2::text, $3::int)",
                vec![Param::Texts(inputs), Param::Text(task), Param::Int(dim)],
                Expect::Batch { dim, inputs: shape, ids: None },
            );
            c.bytes = bytes;
            c
        }
        56..=65 => {
            let inputs = text_array(&mut rng, false);
            let n = inputs.len() as i64;
            let ids: Vec<Option<i64>> = match rng.range(0, 5) {
                0 => (0..n).map(|i| Some(i * 7 - 3)).collect(),
                1 => (0..n).map(|_| if rng.chance(0.3) { None } else { Some(rng.next() as i64) }).collect(),
                2 => (0..n).map(|_| Some(42)).collect(),
                3 => (0..(n + 1)).map(Some).collect(),
                4 => (0..(n - 1).max(0)).map(Some).collect(),
                _ => vec![],
            };
            let (task, dim) = (gen_task(&mut rng, facts), gen_dim(&mut rng, facts));
            let shape =
                if task.is_none() || dim.is_none() { vec![] } else { inputs.iter().map(Option::is_some).collect() };
            let bytes = inputs.iter().flatten().map(String::len).sum();
            let mut c = case(
                Kind::BatchIds,
                "SELECT id, embedding::real[] FROM embed_batch($1::bigint[], $2::text[], $3::text, $4::int)",
                vec![Param::Longs(Some(ids.clone())), Param::Texts(Some(inputs)), Param::Text(task), Param::Int(dim)],
                Expect::Batch { dim, inputs: shape, ids: Some(ids) },
            );
            c.bytes = bytes;
            c
        }
        66..=75 => expr_case(&mut rng, cfg, facts, index),
        76..=81 => {
            let sql = *rng.pick(&[
                "SELECT model_path, device, dtype, dims, max_seq_length, tasks, weights_sha256::text, load_seconds, weights_mb, engine_version FROM embeddinggemma_info()",
                "SELECT * FROM embeddinggemma_stats()",
                "SELECT embeddinggemma_stats_reset()",
                "SELECT (embeddinggemma_stats()).calls, (embeddinggemma_info()).dims",
            ]);
            case(Kind::Info, &format!("SELECT count(*) FROM ({sql}) s"), vec![], Expect::Anything)
        }
        82..=88 => {
            let cols = ["id", "body", "vc", "ch", "v", "vany", "v2", "n", "missing"];
            let col = |rng: &mut Rng| {
                if rng.chance(0.7) {
                    Some(rng.pick(&cols).to_string())
                } else if rng.chance(0.2) {
                    None
                } else {
                    Some(short_text(rng))
                }
            };
            let (source, target) = (col(&mut rng), col(&mut rng));
            let dim = gen_dim(&mut rng, facts);
            match rng.range(0, 2) {
                0 => case(
                    Kind::CheckColumns,
                    "SELECT embeddinggemma_check_columns($1::text::regclass, $2::text, $3::text, $4::int)",
                    vec![
                        Param::Text(Some(rng.pick(&["fz", "fz_row", "pg_class", "nope", "\"FZ\""]).to_string())),
                        Param::Text(source),
                        Param::Text(target),
                        Param::Int(dim),
                    ],
                    Expect::Anything,
                ),
                1 => {
                    let any = rng.range(1, 100_000) as i64;
                    let oid = *rng.pick(&[Some(0i64), Some(1), Some(1259), Some(4_294_967_295), Some(any), None]);
                    case(
                        Kind::CheckColumns,
                        "SELECT embeddinggemma_check_columns($1::bigint::oid::regclass, $2::text, $3::text, $4::int)",
                        vec![Param::Long(oid), Param::Text(source), Param::Text(target), Param::Int(dim)],
                        Expect::Anything,
                    )
                }
                _ => case(
                    Kind::CheckColumns,
                    "SELECT embeddinggemma_check_columns('fz'::regclass, $1::text, $2::text)",
                    vec![Param::Text(source), Param::Text(target)],
                    Expect::Anything,
                ),
            }
        }
        89..=92 => {
            let sql = match rng.range(0, 9) {
                0 => format!("SET embeddinggemma.threads = {}", rng.pick(&[0i64, 1, 2, 3, 1024, 1025, -1])),
                1 => format!(
                    "SET embeddinggemma.max_batch_tokens = {}",
                    rng.pick(&[64i64, 63, 1, 100, 2048, 1 << 20, (1 << 20) + 1, 0])
                ),
                2 => format!("SET embeddinggemma.truncate = {}", rng.pick(&["on", "off", "maybe"])),
                3 => format!("SET embeddinggemma.model_path = '{}'", rng.pick(&["/tmp", "/", ""])),
                4 => "SET embeddinggemma.model_checksums = '/etc/passwd'".into(),
                5 => format!("SET embeddinggemma.device = '{}'", rng.pick(&["cpu", "cuda", "gpu0"])),
                6 => format!("SET embeddinggemma.dtype = '{}'", rng.pick(&["f32", "bf16", "f16"])),
                7 => format!("SET embeddinggemma.max_threads = {}", rng.range(0, 4)),
                8 => "SET embeddinggemma.no_such_setting = 1".into(),
                _ => "RESET ALL".into(),
            };
            case(Kind::Setting, &sql, vec![], Expect::Anything)
        }
        93..=96 => {
            let size = text_size(&mut rng, cfg.max_bytes.min(1 << 20));
            let body = if rng.chance(0.1) { None } else { Some(text_of(&mut rng, size)) };
            let mut c = if rng.chance(0.5) {
                case(
                    Kind::Trigger,
                    "INSERT INTO fz_row (id, body) VALUES ($1::int, $2::text) ON CONFLICT (id) DO UPDATE SET body = excluded.body RETURNING v::real[]",
                    vec![Param::Int(Some(rng.range(1, 50) as i32)), Param::Text(body)],
                    Expect::Vector(Some(dim0)),
                )
            } else {
                // Keys of their own per case (arrays hold fewer than 100,000 texts).
                let texts = text_array(&mut rng, false);
                case(
                    Kind::Trigger,
                    "INSERT INTO fz_stmt (id, body) SELECT o + $2::bigint * 100000, t FROM unnest($1::text[]) WITH ORDINALITY u(t, o)",
                    vec![Param::Texts(Some(texts)), Param::Long(Some(index as i64))],
                    Expect::Anything,
                )
            };
            c.bytes = size;
            c
        }
        _ => case(
            Kind::Reconnect,
            "SELECT embed('after a reconnect', 'query', $1::int)::real[]",
            vec![Param::Int(Some(dim0))],
            Expect::Vector(Some(dim0)),
        ),
    };
    if rng.chance(0.15) {
        c.timeout_ms = *rng.pick(&[1, 10, 100, 300, 1000, 2000]);
    }
    c
}

/// Cases that build their input in SQL: bytes as text, NUL, 2-D arrays, array bounds,
/// repeat(), chr() of every code point, literal NULLs, many calls in one statement.
fn expr_case(rng: &mut Rng, cfg: &Config, facts: &Facts, index: u64) -> Case {
    let dim = *rng.pick(&facts.dims);
    let task = rng.pick(&facts.tasks).clone();
    let mut c = Case {
        index,
        kind: Kind::Expr,
        sql: String::new(),
        params: vec![],
        expect: Expect::Anything,
        timeout_ms: DEFAULT_TIMEOUT_MS,
        bytes: 0,
    };
    match rng.range(0, 13) {
        0 | 1 => {
            // Random bytes, sometimes valid UTF-8, sometimes with NUL or overlong forms.
            let n = rng.range(0, 64) as usize;
            let mut b: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            if rng.chance(0.5) {
                b = String::from_utf8_lossy(&b).into_owned().into_bytes();
                b.retain(|&x| x != 0);
            }
            if rng.chance(0.2) {
                b.extend_from_slice(rng.pick::<&[u8]>(&[
                    &[0xC0u8, 0x80][..],
                    &[0xED, 0xA0, 0x80],
                    &[0xF4, 0x90, 0x80, 0x80],
                    &[0xFF, 0xFE],
                    &[0],
                ]));
            }
            let enc = if rng.chance(0.8) { "UTF8" } else { "LATIN1" };
            c.sql = format!("SELECT embed(convert_from($1::bytea, '{enc}'), $2::text, $3::int)::real[]");
            c.params = vec![Param::Bytes(b), Param::Text(Some(task)), Param::Int(Some(dim))];
            c.expect = Expect::Vector(Some(dim));
        }
        2 => {
            c.sql = rng
                .pick(&[
                    "SELECT embed(chr(0))::real[]",
                    "SELECT embed(E'a\\000b')::real[]",
                    "SELECT embed(E'\\uD800')::real[]",
                    "SELECT embed(U&'\\0000')::real[]",
                ])
                .to_string();
        }
        3 => {
            // A slice of the code points through chr(): surrogates and the like are PostgreSQL's errors.
            let lo = rng.range(1, 0x10FFFF);
            let hi = (lo + rng.range(0, 300)).min(0x10FFFF);
            c.sql = "SELECT embed(string_agg(chr(c::int), ''), $3::text, $4::int)::real[] FROM generate_series($1::bigint, $2::bigint) c".into();
            c.params = vec![
                Param::Long(Some(lo as i64)),
                Param::Long(Some(hi as i64)),
                Param::Text(Some(task)),
                Param::Int(Some(dim)),
            ];
            c.expect = Expect::Vector(Some(dim));
        }
        4 => {
            // Mostly up to the largest text; sometimes past PostgreSQL's 1 GB limit (its error).
            let piece = short_text(rng);
            let len = piece.len().max(1) as u64;
            let times = if rng.chance(0.1) && (1 << 30) / len < i32::MAX as u64 {
                rng.range((1 << 30) / len + 1, i32::MAX as u64) as i64
            } else {
                let times = rng.log_range(1, (cfg.max_bytes as u64 / len).max(1)) as i64;
                c.bytes = times as usize * piece.len();
                times
            };
            c.sql = "SELECT embed(repeat($1::text, $2::int), $3::text, $4::int)::real[]".into();
            c.params = vec![
                Param::Text(Some(piece)),
                Param::Int(Some(times.min(i32::MAX as i64) as i32)),
                Param::Text(Some(task)),
                Param::Int(Some(dim)),
            ];
            c.expect = Expect::Vector(Some(dim));
        }
        5 => {
            let n = rng.log_range(1, 20_000) as i32;
            c.sql = "SELECT count(*), count(embedding), min(ord), max(ord) FROM embed_batch(array_fill($1::text, ARRAY[$2::int]), $3::text, $4::int)".into();
            c.params = vec![
                Param::Text(Some(short_text(rng))),
                Param::Int(Some(n)),
                Param::Text(Some(task)),
                Param::Int(Some(dim)),
            ];
        }
        6 => {
            c.sql = rng
                .pick(&[
                    "SELECT ord, embedding::real[] FROM embed_batch(ARRAY[[$1::text, NULL], [$2::text, 'x']], 'query', $3::int)",
                    "SELECT ord, embedding::real[] FROM embed_batch(('[0:2]={' || quote_ident($1::text) || ',NULL,' || quote_ident($2::text) || '}')::text[], 'query', $3::int)",
                    "SELECT ord, embedding::real[] FROM embed_batch(ARRAY[$1::text, $2::text, NULL, $1::text], 'none', $3::int)",
                ])
                .to_string();
            c.params =
                vec![Param::Text(Some(short_text(rng))), Param::Text(Some(short_text(rng))), Param::Int(Some(dim))];
            c.expect = Expect::Vectors(Some(dim));
        }
        7 => {
            c.sql = rng
                .pick(&[
                    "SELECT embed(NULL)::real[]",
                    "SELECT embed('x', NULL)::real[]",
                    "SELECT embed('x', 'query', NULL)::real[]",
                    "SELECT embed(NULL, NULL, NULL)::real[]",
                    "SELECT count(*) FROM embed_batch(NULL::text[])",
                    "SELECT count(*) FROM embed_batch(ARRAY[NULL, NULL]::text[], NULL)",
                    "SELECT count(*) FROM embed_batch(NULL::bigint[], ARRAY['x'])",
                    "SELECT count(*) FROM embed_batch(ARRAY[1, 2]::bigint[], NULL::text[])",
                    "SELECT count(*) FROM embed_batch('{}'::text[], 'nonsense', 0)",
                    "SELECT count(*) FROM embed_batch('{}'::bigint[], '{}'::text[])",
                    "SELECT embeddinggemma_check_columns(NULL, 'body', 'v')",
                    "SELECT embed('x', 'query', 2147483648)::real[]",
                    "SELECT embed(repeat('x', 100), 'query', '48')::real[]",
                    "SELECT count(*) FROM embed_batch(ARRAY['a'], ARRAY['b'])",
                ])
                .to_string();
        }
        8 => {
            let texts = text_array(rng, false);
            c.bytes = texts.iter().flatten().map(String::len).sum();
            c.sql = "SELECT embed(t, $2::text, $3::int)::real[] FROM unnest($1::text[]) t".into();
            c.params = vec![Param::Texts(Some(texts)), Param::Text(Some(task)), Param::Int(Some(dim))];
            c.expect = Expect::Vectors(Some(dim));
        }
        9 => {
            let n = rng.log_range(1, 3000) as i64;
            c.sql = "SELECT embed(md5(g::text) || $2::text, 'query', $3::int)::real[] FROM generate_series(1, $1::bigint) g".into();
            c.params = vec![Param::Long(Some(n)), Param::Text(Some(short_text(rng))), Param::Int(Some(dim))];
            c.expect = Expect::Vectors(Some(dim));
        }
        10 => {
            // In a transaction with savepoints: an error inside rolls back to the savepoint.
            c.sql = "BEGIN; SAVEPOINT a; SELECT embed($1::text, 'query', 48); ROLLBACK TO a; SELECT embed('x', 'nonsense'); COMMIT".into();
            c.sql = c.sql.replace("$1::text", &format!("'{}'", short_text(rng).replace('\'', "''").replace('\0', "")));
        }
        11 => {
            c.sql = "SELECT embed(string_agg(x, ' '), 'query', $2::int)::real[] FROM (SELECT repeat(chr(($1::int + g) % 1000 + 32), 3) x FROM generate_series(1, 5000) g) s".into();
            c.params = vec![Param::Int(Some(rng.range(0, 1000) as i32)), Param::Int(Some(dim))];
            c.expect = Expect::Vector(Some(dim));
        }
        12 => {
            c.sql = "SELECT e.embedding::real[] FROM embed_batch($1::text[], 'query', $2::int) e ORDER BY e.embedding <=> embed('query', 'query', $2::int) LIMIT 3".into();
            c.params = vec![Param::Texts(Some(text_array(rng, false))), Param::Int(Some(dim))];
            c.expect = Expect::Vectors(Some(dim));
        }
        _ => {
            // A parse error and an unknown function: plain PostgreSQL errors.
            c.sql = rng.pick(&["SELECT embed(", "SELECT embedd('x')", "SELECT embed_batch(ARRAY[1,2])"]).to_string();
        }
    }
    c
}

// ---------------------------------------------------------------------------------------------
// Running cases.

/// Errors PostgreSQL itself raises (from its C code, not ours) that carry no HINT. An error
/// from our Rust code (or the statement trigger's PL/pgSQL) always needs one.
fn allowed_without_hint(code: &str, kind: Kind) -> Option<&'static str> {
    Some(match code {
        // Cancel requests and statement_timeout are raised by CHECK_FOR_INTERRUPTS (the engine,
        // when it sees the request, lets PostgreSQL raise it).
        "57014" => "query canceled by a cancel request or statement_timeout",
        // A NUL or an invalid UTF-8 sequence is refused when PostgreSQL reads the parameter or
        // converts bytes to text, before any function runs.
        "22021" => "invalid byte sequence for the database encoding",
        // chr(0), repeat() past 1 GB, chr() of a code point the encoding lacks: PostgreSQL's
        // own limits on building the argument.
        "54000" => "PostgreSQL's limits on building a value (chr, repeat, array size)",
        // Literal syntax of an array, a number, a Unicode escape.
        "22P02" | "22P05" | "42601" | "22025" => {
            "malformed literal or statement, refused by the parser or input function"
        }
        // text → regclass of a name that is no table (regclassin).
        "42P01" => "relation named by a text → regclass cast does not exist",
        // Function resolution.
        "42883" | "42725" => "no (or no unique) function matches the argument types",
        // A cast into int or oid out of range.
        "22003" => "value out of range in a cast of an argument",
        // SET of a value the setting's own range or enum rejects, of a superuser-only setting,
        // of an unknown name under the reserved prefix.
        "22023" | "42501" | "42602" | "42704" | "55P02" if kind == Kind::Setting => {
            "SET refused by PostgreSQL's GUC machinery"
        }
        _ => return None,
    })
}

#[derive(Default)]
struct Tally {
    tried: u64,
    successes: u64,
    nulls: u64,
    errors: BTreeMap<String, (u64, u64, String)>, // code → (count, without hint, a message)
    /// Codes seen without a HINT and allowed, with the reason.
    allowed: BTreeMap<String, &'static str>,
    by_kind: BTreeMap<String, u64>,
    violations: Vec<String>,
    lost: Vec<String>,
    reconnects: u64,
    /// Inputs with at least 1 MB and at least 10 MB of text, and the most bytes of text in one.
    big: (u64, u64, usize),
    /// The slowest statements: (seconds, statement_timeout in ms, description).
    slowest: Vec<(f64, u64, String)>,
    /// The longest a statement ran past its statement_timeout: (seconds, description).
    overrun: (f64, String),
}

fn norm_ok(v: &[f32]) -> bool {
    let n = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    (n - 1.0).abs() < 1e-3 && v.iter().all(|x| x.is_finite())
}

fn check_vector(v: Option<Vec<f32>>, dim: Option<i32>, what: &str) -> Result<(), String> {
    match (v, dim) {
        (None, _) => Ok(()),
        (Some(v), Some(d)) if v.len() == d as usize && norm_ok(&v) => Ok(()),
        (Some(v), _) => Err(format!("{what}: a vector of {} values (asked {dim:?}), norm ok {}", v.len(), norm_ok(&v))),
    }
}

/// Runs a case: Ok(Ok(null?)) success, Ok(Err) a wrong result, Err the statement's error.
fn run_case(client: &mut Client, case: &Case) -> Result<Result<bool, String>, postgres::Error> {
    let params: Vec<&(dyn ToSql + Sync)> = case.params.iter().map(Param::sql).collect();
    if case.params.is_empty() && matches!(case.expect, Expect::Anything) {
        client.batch_execute(&case.sql)?;
        return Ok(Ok(false));
    }
    let rows = client.query(case.sql.as_str(), &params)?;
    Ok(match &case.expect {
        Expect::Anything => Ok(false),
        Expect::Vector(dim) => {
            if rows.len() != 1 {
                Err(format!("{} rows, expected 1", rows.len()))
            } else {
                let v: Option<Vec<f32>> = rows[0].get(0);
                let null = v.is_none();
                check_vector(v, *dim, "vector").map(|_| null)
            }
        }
        Expect::Vectors(dim) => {
            rows.iter().try_for_each(|r| check_vector(r.get(r.len() - 1), *dim, "vector")).map(|_| false)
        }
        Expect::Batch { dim, inputs, ids } => (|| {
            if rows.len() != inputs.len() {
                return Err(format!("{} rows for {} inputs", rows.len(), inputs.len()));
            }
            for (i, (row, &present)) in rows.iter().zip(inputs).enumerate() {
                match ids {
                    None => {
                        let ord: i32 = row.get(0);
                        if ord != i as i32 + 1 {
                            return Err(format!("row {i} has ord {ord}"));
                        }
                    }
                    Some(ids) => {
                        let id: Option<i64> = row.get(0);
                        if id != ids[i] {
                            return Err(format!("row {i} has id {id:?}, expected {:?}", ids[i]));
                        }
                    }
                }
                let v: Option<Vec<f32>> = row.get(1);
                if v.is_some() != present {
                    return Err(format!("row {i}: NULL input ↔ NULL vector broken (input present {present})"));
                }
                check_vector(v, *dim, &format!("row {i}"))?;
            }
            Ok(false)
        })(),
    })
}

/// A fuzz session: a backend of the ordinary role, its pid and cancel token published for the
/// canceller, and the temp tables check_columns and the triggers use.
struct Session {
    client: Client,
    timeout_ms: u64,
}

fn open_session(slot: usize, targets: &Mutex<Vec<Option<(CancelToken, i32)>>>, dim: i32) -> Session {
    let mut client = connect_as(ROLE);
    client
        .batch_execute(&format!(
            "SET statement_timeout = {DEFAULT_TIMEOUT_MS};
             SET client_min_messages = error;
             CREATE TEMP TABLE fz (id int, body text, vc varchar(20), ch char(8), v vector({dim}), vany vector, v2 vector(768), n int);
             CREATE TEMP TABLE fz_row (id int PRIMARY KEY, body text, v vector({dim}));
             CREATE TRIGGER fz_row_embed BEFORE INSERT OR UPDATE ON fz_row
               FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v', 'query', '{dim}');
             CREATE TEMP TABLE fz_stmt (id bigint PRIMARY KEY, body text, v vector({dim}));
             CREATE TRIGGER fz_stmt_embed AFTER INSERT ON fz_stmt REFERENCING NEW TABLE AS new_rows
               FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v', 'document', '{dim}');"
        ))
        .unwrap_or_else(|e| panic!("session setup: {e:?}"));
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    targets.lock().unwrap()[slot] = Some((client.cancel_token(), pid));
    Session { client, timeout_ms: DEFAULT_TIMEOUT_MS }
}

struct Shared {
    next: AtomicU64,
    deadline: Instant,
    huge: Mutex<()>,
    tally: Mutex<Tally>,
    targets: Mutex<Vec<Option<(CancelToken, i32)>>>,
    stopped_by_time: AtomicBool,
}

fn session_thread(slot: usize, cfg: Arc<Config>, facts: Arc<Facts>, shared: Arc<Shared>) {
    let dim0 = facts.dims[0];
    let mut session = open_session(slot, &shared.targets, dim0);
    loop {
        let index = match cfg.only {
            Some(k) => {
                if shared.next.fetch_add(1, Ordering::SeqCst) > 0 {
                    break;
                }
                k
            }
            None => {
                let k = shared.next.fetch_add(1, Ordering::SeqCst);
                if k >= cfg.inputs {
                    break;
                }
                if Instant::now() >= shared.deadline {
                    shared.stopped_by_time.store(true, Ordering::SeqCst);
                    break;
                }
                k
            }
        };
        let case = make_case(&cfg, &facts, index);
        if cfg.only.is_some() {
            eprintln!("{}", case.describe());
        }
        if case.kind == Kind::Reconnect {
            drop(std::mem::replace(&mut session, open_session(slot, &shared.targets, dim0)));
            shared.tally.lock().unwrap().reconnects += 1;
        }
        let _huge = (case.bytes >= HUGE).then(|| shared.huge.lock().unwrap_or_else(|e| e.into_inner()));
        let started = Instant::now();
        let mut result = Ok(Ok(false));
        if session.timeout_ms != case.timeout_ms {
            result = session
                .client
                .batch_execute(&format!("SET statement_timeout = {}", case.timeout_ms))
                .map(|_| Ok(false));
            // Unknown after a failed SET (or a case that resets settings): set it again next time.
            session.timeout_ms = if result.is_ok() && case.kind != Kind::Setting { case.timeout_ms } else { 0 };
        }
        if matches!(result, Ok(Ok(_))) {
            result = run_case(&mut session.client, &case);
        }
        if case.kind == Kind::Setting {
            session.timeout_ms = 0;
        }
        if result.is_err() && !session.client.is_closed() {
            // Out of any transaction block the case left aborted (a stray cancel may hit this too).
            for _ in 0..3 {
                if session.client.batch_execute("ROLLBACK").is_ok() {
                    break;
                }
            }
        }
        let took = started.elapsed().as_secs_f64();
        let mut lost = false;
        {
            let mut t = shared.tally.lock().unwrap();
            t.tried += 1;
            t.big.0 += (case.bytes >= 1 << 20) as u64;
            t.big.1 += (case.bytes >= 10 << 20) as u64;
            t.big.2 = t.big.2.max(case.bytes);
            *t.by_kind.entry(format!("{:?}", case.kind)).or_default() += 1;
            let what = format!("case #{} {:?}, {} text bytes", case.index, case.kind, case.bytes);
            let late = took - case.timeout_ms as f64 / 1000.0;
            if late > t.overrun.0 {
                t.overrun = (late, what.clone());
            }
            t.slowest.push((took, case.timeout_ms, what));
            t.slowest.sort_by(|a, b| b.0.total_cmp(&a.0));
            t.slowest.truncate(5);
            match result {
                Ok(Ok(null)) => {
                    t.successes += 1;
                    t.nulls += null as u64;
                }
                Ok(Err(wrong)) => t.violations.push(format!("wrong result: {wrong}\n  {}", case.describe())),
                Err(e) => match e.as_db_error() {
                    Some(db) => {
                        let code = db.code().code().to_string();
                        let entry = t.errors.entry(code.clone()).or_insert_with(|| (0, 0, db.message().to_string()));
                        entry.0 += 1;
                        // Raised by our Rust code or the statement trigger's RAISE (PL/pgSQL), not
                        // by PostgreSQL's own C sources (*.c, or its scanner and grammar).
                        let ours = db.file().is_none_or(|f| f.ends_with(".rs") || f == "pl_exec.c");
                        if db.hint().is_none() {
                            entry.1 += 1;
                            let allowed = allowed_without_hint(&code, case.kind).filter(|_| !ours);
                            if let Some(reason) = allowed {
                                t.allowed.insert(code.clone(), reason);
                            } else {
                                t.violations.push(format!(
                                    "error without a HINT: {code} {:?} (at {}:{} in {}, severity {})\n  {}",
                                    db.message(),
                                    db.file().unwrap_or("?"),
                                    db.line().unwrap_or(0),
                                    db.routine().unwrap_or("?"),
                                    db.severity(),
                                    case.describe()
                                ));
                            }
                        }
                        if db.severity() == "FATAL" || db.severity() == "PANIC" || session.client.is_closed() {
                            lost = true;
                            t.lost.push(format!(
                                "session ended with {} {code} {:?}\n  {}",
                                db.severity(),
                                db.message(),
                                case.describe()
                            ));
                        }
                    }
                    None => {
                        lost = true;
                        t.lost.push(format!("connection lost: {e}\n  {}", case.describe()));
                    }
                },
            }
        }
        if lost || session.client.is_closed() {
            session = open_session(slot, &shared.targets, dim0);
        }
        // A cancel meant for this case may arrive after it: PostgreSQL then ignores it, or it
        // cancels the next case, which is counted like any other cancel.
    }
    shared.targets.lock().unwrap()[slot] = None;
}

/// Cancels a random session at random moments until told to stop: half through the client's
/// cancel token, half with pg_cancel_backend() from another session of the same role.
fn canceller(seed: u64, shared: Arc<Shared>, stop: mpsc::Receiver<()>) -> u64 {
    let mut rng = Rng::new(seed ^ 0xCA9CE1);
    let mut client = connect_as(ROLE);
    let mut sent = 0;
    loop {
        match stop.recv_timeout(Duration::from_millis(rng.range(20, 600))) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return sent,
        }
        let target = {
            let targets = shared.targets.lock().unwrap();
            let live: Vec<_> = targets.iter().flatten().cloned().collect();
            if live.is_empty() {
                continue;
            }
            rng.pick(&live).clone()
        };
        let ok = if rng.chance(0.5) {
            target.0.cancel_query(NoTls).is_ok()
        } else {
            client.query_one("SELECT pg_cancel_backend($1)", &[&target.1]).map(|r| r.get::<_, bool>(0)).unwrap_or(false)
        };
        sent += ok as u64;
    }
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn sql_fuzz_campaign() {
    let cfg = Arc::new(Config::from_env());
    tiny_model_role(ROLE);
    let log = server_log();
    let log_start = log.as_deref().map(file_len).unwrap_or(0);

    // Connections outside the campaign, opened before it: they must survive it.
    let mut admin = connect();
    let postmaster_started: SystemTime = admin.query_one("SELECT pg_postmaster_start_time()", &[]).unwrap().get(0);
    let admin_pid: i32 = admin.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let mut bystander = connect_as(ROLE);
    let row = bystander
        .query_one("SELECT model_path, dims, tasks, pg_backend_pid() FROM embeddinggemma_info()", &[])
        .unwrap();
    let model_path: String = row.get(0);
    assert_eq!(
        std::path::Path::new(&model_path),
        tiny_model_dir().canonicalize().unwrap(),
        "ALTER ROLE {ROLE} SET embeddinggemma.model_path did not apply"
    );
    let facts = Arc::new(Facts { dims: row.get(1), tasks: row.get(2) });
    let bystander_pid: i32 = row.get(3);
    let probe = embed(&mut bystander, "bystander", "query", facts.dims[0]);

    let started = Instant::now();
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        deadline: started + Duration::from_secs(cfg.seconds),
        huge: Mutex::new(()),
        tally: Mutex::new(Tally::default()),
        targets: Mutex::new((0..cfg.sessions).map(|_| None).collect()),
        stopped_by_time: AtomicBool::new(false),
    });
    let sessions = if cfg.only.is_some() { 1 } else { cfg.sessions };
    let (done_tx, done_rx) = mpsc::channel::<usize>();
    let handles: Vec<_> = (0..sessions)
        .map(|slot| {
            let (cfg, facts, shared, done) = (cfg.clone(), facts.clone(), shared.clone(), done_tx.clone());
            std::thread::spawn(move || {
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session_thread(slot, cfg, facts, shared)));
                let _ = done.send(slot);
                if let Err(p) = r {
                    std::panic::resume_unwind(p);
                }
            })
        })
        .collect();
    let (stop_tx, stop_rx) = mpsc::channel();
    let cancels = if cfg.only.is_none() {
        let shared = shared.clone();
        let seed = cfg.seed;
        Some(std::thread::spawn(move || canceller(seed, shared, stop_rx)))
    } else {
        None
    };
    // Wait for the sessions, but never past the time bound plus a grace for statements that
    // were running when it passed (a statement that outlives it is a finding: it ignored its
    // statement_timeout).
    let hard_deadline = shared.deadline + Duration::from_secs(120 + 3 * DEFAULT_TIMEOUT_MS / 1000);
    let mut finished = 0;
    while finished < sessions {
        let left = hard_deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(_) => finished += 1,
            Err(_) => panic!(
                "{} fuzz session(s) still running 120 s past the time bound: a statement ignores statement_timeout and cancel; slowest so far: {:#?}",
                sessions - finished,
                shared.tally.lock().unwrap().slowest
            ),
        }
    }
    let _ = stop_tx.send(());
    let cancels = cancels.map(|h| h.join().unwrap()).unwrap_or(0);
    // A session that panicked (e.g. could not reconnect) fails the test after the summary.
    let panicked: Vec<_> = handles.into_iter().filter_map(|h| h.join().err()).collect();
    let elapsed = started.elapsed();

    // Afterwards: the same server, the bystanders' backends still there and working.
    // (Checked after the summary is printed.)
    let admin_alive = admin
        .query_one("SELECT 1, pg_backend_pid(), pg_postmaster_start_time()", &[])
        .map(|r| (r.get::<_, i32>(1), r.get::<_, SystemTime>(2)));
    let bystander_alive = bystander
        .query_one("SELECT embed('bystander', 'query', $1)::real[], pg_backend_pid()", &[&facts.dims[0]])
        .map(|r| (r.get::<_, Vec<f32>>(0), r.get::<_, i32>(1)));
    let now_started = admin_alive.as_ref().ok().map(|a| a.1);
    let crash_log = log.as_deref().map(|path| {
        let text = std::fs::read(path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text[(log_start as usize).min(text.len())..]).into_owned();
        crash_lines(&text)
    });

    let t = shared.tally.lock().unwrap();
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "\nSQL fuzz campaign: seed {}, {} inputs tried of {} asked{} in {:.1} s, {} sessions of role {ROLE} (tiny model, dims {:?}), {} cancels sent, texts up to {} bytes",
        cfg.seed,
        t.tried,
        cfg.only.map(|_| 1).unwrap_or(cfg.inputs),
        if shared.stopped_by_time.load(Ordering::SeqCst) { " (stopped by the time bound)" } else { "" },
        elapsed.as_secs_f64(),
        sessions,
        facts.dims,
        cancels,
        cfg.max_bytes,
    );
    let _ = writeln!(summary, "  inputs by kind: {:?}", t.by_kind);
    let _ = writeln!(
        summary,
        "  inputs with ≥ 1 MB of text: {}, ≥ 10 MB: {}, largest: {} bytes",
        t.big.0, t.big.1, t.big.2
    );
    let _ = writeln!(
        summary,
        "  successes: {} ({} NULL results), reconnects by the campaign: {}",
        t.successes, t.nulls, t.reconnects
    );
    let _ = writeln!(summary, "  errors by SQLSTATE (count, of them without HINT, a message):");
    for (code, (n, no_hint, msg)) in &t.errors {
        let msg: String = msg.chars().take(110).collect();
        let _ = writeln!(summary, "    {code} {n:>6} {no_hint:>6}  {msg:?}");
    }
    let _ = writeln!(summary, "  without HINT and allowed (PostgreSQL's own errors): {:?}", t.allowed);
    let _ = writeln!(summary, "  slowest statements:");
    for (took, timeout, what) in &t.slowest {
        let _ = writeln!(summary, "    {took:.2} s (statement_timeout {timeout} ms) {what}");
    }
    let _ = writeln!(summary, "  longest run past statement_timeout: {:.2} s {}", t.overrun.0, t.overrun.1);
    let _ = writeln!(
        summary,
        "  backend crashes: {} lost connections, postmaster restarted: {}, server log: {}",
        t.lost.len(),
        now_started.map(|t| (t != postmaster_started).to_string()).unwrap_or_else(|| "unknown (no connection)".into()),
        match (&log, &crash_log) {
            (Some(p), Some(lines)) if lines.is_empty() => format!("no crash in {}", p.display()),
            (Some(p), Some(lines)) => format!("{} crash lines in {}", lines.len(), p.display()),
            _ => "not readable (set EMBEDDINGGEMMA_TEST_SERVER_LOG)".into(),
        }
    );
    let _ = writeln!(summary, "  problems: {}", t.violations.len());
    eprintln!("{summary}");
    for v in t.lost.iter().chain(&t.violations).take(40) {
        eprintln!("PROBLEM {v}\n");
    }
    if let Some(lines) = &crash_log {
        for l in lines.iter().take(40) {
            eprintln!("SERVER LOG {l}");
        }
    }
    if let Some(p) = panicked.into_iter().next() {
        std::panic::resume_unwind(p);
    }
    let (pid, started_then) = admin_alive.expect("the superuser connection opened before the campaign is gone");
    assert_eq!(pid, admin_pid);
    assert_eq!(started_then, postmaster_started, "the postmaster restarted: a backend crashed");
    let (again, pid) = bystander_alive.expect("the ordinary connection opened before the campaign is gone");
    assert_eq!(pid, bystander_pid);
    assert!(cosine_distance(&again, &probe) <= 1e-6, "the bystander's vector changed");
    assert!(crash_log.as_ref().is_none_or(|l| l.is_empty()), "the server log shows a crash");
    assert!(t.lost.is_empty(), "{} fuzz sessions lost their connection", t.lost.len());
    assert!(t.violations.is_empty(), "{} problems (see PROBLEM lines)", t.violations.len());
}
