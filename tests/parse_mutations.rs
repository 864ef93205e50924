//! A deterministic mutation run of the parser's invariants on stable Rust (the cargo-fuzz
//! target in fuzz/ does the same, coverage-guided, on nightly): every corpus message,
//! mutated by flips, truncations, splices and insertions of SIP-significant bytes.

use std::path::PathBuf;

fn corpus() -> Vec<Vec<u8>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in [
        root.join("../shared/conformance/rfc4475"),
        root.join("tests/corpus"),
    ] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("dat") | Some("sip")
            ) {
                out.push(std::fs::read(path).unwrap());
            }
        }
    }
    out
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\r\n",
    b"\r\n ",
    b":",
    b";",
    b",",
    b"<",
    b">",
    b"\"",
    b"[",
    b"]",
    b"@",
    b"%",
    b"\0",
    b"\xff",
    b"Content-Length: 99999\r\n",
    b"l: -1\r\n",
    b"Via: SIP/2.0/UDP [::1\r\n",
    b" ",
    b"\t",
    b"=",
    b"?",
    b"SIP/2.0",
    b"\r\n\r\n",
];

#[test]
fn mutated_corpus_never_breaks_invariants() {
    let corpus = corpus();
    assert!(corpus.len() > 60);
    let mut rng = XorShift(0x5eed_1234_abcd_0042);
    for _ in 0..100_000 {
        let mut m = corpus[rng.below(corpus.len())].clone();
        for _ in 0..=rng.below(4) {
            let at = rng.below(m.len() + 1);
            match rng.below(5) {
                0 if !m.is_empty() => {
                    let i = at.min(m.len() - 1);
                    m[i] ^= 1 << rng.below(8);
                }
                1 => m.truncate(at),
                2 => {
                    let ins = INTERESTING[rng.below(INTERESTING.len())];
                    m.splice(at..at, ins.iter().copied());
                }
                3 if !m.is_empty() => {
                    let end = (at + rng.below(16)).min(m.len());
                    m.drain(at.min(end)..end);
                }
                _ => {
                    let other = &corpus[rng.below(corpus.len())];
                    let from = rng.below(other.len());
                    let end = (from + rng.below(64)).min(other.len());
                    m.splice(at..at, other[from..end].iter().copied());
                }
            }
        }
        strowger::uas::check_invariants(&m);
    }
}
