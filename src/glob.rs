//! Glob patterns from untrusted input (sync filters, push rules), matched in bounded time and
//! without panics, over characters (never byte slices).
//!
//! - [`matches`]: `*` (any run of characters, possibly empty) and, when asked, `?` (exactly one
//!   character), over the whole value. The greedy two-pointer algorithm with one backtrack point:
//!   O(n·m) in the worst case, O(n + m) for ordinary patterns, no recursion, no allocation for
//!   ASCII input. Used by sync filters (whose spec has only `*`).
//! - [`Glob`]: a compiled `*`/`?` pattern for push rules, matched by a bit-parallel NFA
//!   (Shift-And): O(n·⌈m/64⌉) for any pattern and value, both for the whole value and for the
//!   spec's `content.body` word matching (a substring that starts and ends on word boundaries);
//!   plain text of at most 64 bytes is found by substring search instead (O(n·64) at worst).
//!
//! Neither ever builds a regex: a pattern's length changes only the cost, linearly.

/// Whether `pattern` matches all of `value`: `*` is any run of characters, `?` exactly one
/// character when `question` is true (else a literal `?`).
pub fn matches(pattern: &str, value: &str, question: bool) -> bool {
    if pattern.is_ascii() && value.is_ascii() {
        wild(pattern.as_bytes(), value.as_bytes(), b'*', question.then_some(b'?'))
    } else {
        let p: Vec<char> = pattern.chars().collect();
        let v: Vec<char> = value.chars().collect();
        wild(&p, &v, '*', question.then_some('?'))
    }
}

fn wild<T: PartialEq + Copy>(p: &[T], v: &[T], star: T, any: Option<T>) -> bool {
    let (mut pi, mut vi) = (0, 0);
    // After a `*`: the pattern index just past it and the value index it is tried at next.
    let mut backtrack: Option<(usize, usize)> = None;
    while vi < v.len() {
        match p.get(pi) {
            Some(&c) if c == star => {
                backtrack = Some((pi + 1, vi));
                pi += 1;
            }
            Some(&c) if Some(c) == any || c == v[vi] => {
                pi += 1;
                vi += 1;
            }
            _ => match backtrack {
                // The last `*` absorbs one more character; earlier ones never need to.
                Some((bp, bv)) => {
                    backtrack = Some((bp, bv + 1));
                    pi = bp;
                    vi = bv + 1;
                }
                None => return false,
            },
        }
    }
    p[pi.min(p.len())..].iter().all(|&c| c == star)
}

/// A `*`/`?` glob compiled for repeated matching against long values.
#[derive(Debug, Clone)]
pub struct Glob {
    /// Pattern elements after collapsing runs of `*` (a run means the same as one `*`).
    len: usize,
    /// u64 words per state set (`len + 1` states).
    words: usize,
    star: Vec<u64>,
    any: Vec<u64>,
    /// Per literal character, the positions holding it: ASCII by table, others sorted.
    ascii: [u32; 128],
    other: Vec<(char, u32)>,
    /// Masks, `words` each, indexed by the values of `ascii` (minus one) and `other`.
    masks: Vec<u64>,
    /// No wildcard at all: a whole-value match is a comparison, a short one in words mode a
    /// substring search.
    literal: Option<String>,
}

fn set(bits: &mut [u64], i: usize) {
    bits[i / 64] |= 1 << (i % 64);
}

fn get(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

/// `dst |= src << 1` over a multi-word set.
fn or_shl1(src: &[u64], dst: &mut [u64]) {
    let mut carry = 0;
    for (o, &b) in dst.iter_mut().zip(src) {
        *o |= (b << 1) | carry;
        carry = b >> 63;
    }
}

/// The spec's word characters for `content.body` matching: `[A-Za-z0-9_]`.
fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

impl Glob {
    pub fn new(pattern: &str) -> Self {
        let mut elems: Vec<char> = Vec::with_capacity(pattern.len());
        for c in pattern.chars() {
            if !(c == '*' && elems.last() == Some(&'*')) {
                elems.push(c);
            }
        }
        let len = elems.len();
        let words = len / 64 + 1;
        let mut g = Glob {
            len,
            words,
            star: vec![0; words],
            any: vec![0; words],
            ascii: [0; 128],
            other: Vec::new(),
            masks: Vec::new(),
            literal: (!pattern.contains(['*', '?'])).then(|| pattern.to_owned()),
        };
        for (i, &c) in elems.iter().enumerate() {
            match c {
                '*' => set(&mut g.star, i),
                '?' => set(&mut g.any, i),
                c => {
                    let slot = g.slot_or_insert(c);
                    set(&mut g.masks[slot * words..(slot + 1) * words], i);
                }
            }
        }
        g.other.sort_unstable_by_key(|e| e.0);
        g
    }

    fn slot_or_insert(&mut self, c: char) -> usize {
        let existing = if (c as u32) < 128 {
            self.ascii[c as usize].checked_sub(1)
        } else {
            self.other.iter().find(|e| e.0 == c).map(|e| e.1)
        };
        if let Some(s) = existing {
            return s as usize;
        }
        let slot = (self.masks.len() / self.words) as u32;
        self.masks.extend(std::iter::repeat_n(0, self.words));
        if (c as u32) < 128 {
            self.ascii[c as usize] = slot + 1;
        } else {
            self.other.push((c, slot));
        }
        slot as usize
    }

    fn mask(&self, c: char) -> Option<&[u64]> {
        let slot = if (c as u32) < 128 {
            self.ascii[c as usize].checked_sub(1)?
        } else {
            let i = self.other.binary_search_by_key(&c, |e| e.0).ok()?;
            self.other[i].1
        } as usize;
        Some(&self.masks[slot * self.words..(slot + 1) * self.words])
    }

    /// Adds state 0 and what `*` reaches from it without consuming.
    fn start(&self, d: &mut [u64]) {
        set(d, 0);
        if self.len > 0 && get(&self.star, 0) {
            set(d, 1);
        }
    }

    /// One character: `d` becomes the states reachable from `d` by consuming `c`.
    fn step(&self, d: &mut [u64], tmp: &mut [u64], c: char) {
        let lit = self.mask(c);
        // d = (d & star) | ((d & (lit | any)) << 1): a `*` consumes and stays, a literal or `?`
        // consumes and moves on.
        for i in 0..self.words {
            tmp[i] = d[i] & (self.any[i] | lit.map_or(0, |m| m[i]));
            d[i] &= self.star[i];
        }
        or_shl1(tmp, d);
        // Closure: a state before a `*` also reaches the state after it (runs were collapsed,
        // so one step is enough).
        for i in 0..self.words {
            tmp[i] = d[i] & self.star[i];
        }
        or_shl1(tmp, d);
    }

    /// Whether the pattern matches all of `value`.
    pub fn is_match(&self, value: &str) -> bool {
        if let Some(lit) = &self.literal {
            return lit == value;
        }
        let mut d = vec![0u64; self.words];
        let mut tmp = vec![0u64; self.words];
        self.start(&mut d);
        for c in value.chars() {
            self.step(&mut d, &mut tmp, c);
            if d.iter().all(|&w| w == 0) {
                return false;
            }
        }
        get(&d, self.len)
    }

    /// Whether the pattern matches a substring of `value` that starts and ends on word
    /// boundaries (the start or end of the value, or next to a character outside
    /// `[A-Za-z0-9_]`), as the spec matches `content.body`. An empty pattern matches only an
    /// empty value.
    pub fn is_match_words(&self, value: &str) -> bool {
        if self.len == 0 {
            return value.is_empty();
        }
        if let Some(lit) = self.literal.as_deref().filter(|l| l.len() <= SHORT_LITERAL) {
            // Plain text (a localpart, a display name, a keyword): substring search, trying
            // every occurrence (overlapping ones too), O(n·m) with m ≤ 64.
            let mut from = 0;
            while let Some(i) = value[from..].find(lit) {
                let start = from + i;
                if boundary(value, start) && boundary(value, start + lit.len()) {
                    return true;
                }
                from = start + value[start..].chars().next().map_or(1, char::len_utf8);
            }
            return false;
        }
        let mut d = vec![0u64; self.words];
        let mut tmp = vec![0u64; self.words];
        let mut prev: Option<char> = None;
        let mut chars = value.chars().peekable();
        loop {
            let next = chars.peek().copied();
            // A boundary sits here unless both neighbours are word characters.
            let here = !(prev.is_some_and(is_word) && next.is_some_and(is_word));
            if here {
                self.start(&mut d);
                if get(&d, self.len) {
                    return true;
                }
            }
            let Some(c) = chars.next() else { return false };
            self.step(&mut d, &mut tmp, c);
            prev = Some(c);
        }
    }
}

/// Literal patterns up to this many bytes are matched in words mode by substring search.
const SHORT_LITERAL: usize = 64;

/// Whether byte offset `i` (a char boundary) of `value` is a word boundary.
fn boundary(value: &str, i: usize) -> bool {
    let before = value[..i].chars().next_back();
    let after = value[i..].chars().next();
    !(before.is_some_and(is_word) && after.is_some_and(is_word))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The obvious dynamic programme: the reference the fast matchers must agree with.
    fn reference(p: &[char], v: &[char], question: bool) -> bool {
        let mut dp = vec![vec![false; v.len() + 1]; p.len() + 1];
        dp[0][0] = true;
        for i in 1..=p.len() {
            for j in 0..=v.len() {
                dp[i][j] = match p[i - 1] {
                    '*' => dp[i - 1][j] || (j > 0 && dp[i][j - 1]),
                    '?' if question => j > 0 && dp[i - 1][j - 1],
                    c => j > 0 && dp[i - 1][j - 1] && v[j - 1] == c,
                };
            }
        }
        dp[p.len()][v.len()]
    }

    fn reference_words(p: &str, v: &str) -> bool {
        if p.is_empty() {
            return v.is_empty();
        }
        let pc: Vec<char> = p.chars().collect();
        let vc: Vec<char> = v.chars().collect();
        let b = |i: usize| !(i > 0 && i < vc.len() && is_word(vc[i - 1]) && is_word(vc[i]));
        (0..=vc.len()).any(|i| b(i) && (i..=vc.len()).any(|j| b(j) && reference(&pc, &vc[i..j], true)))
    }

    #[test]
    fn examples() {
        assert!(matches("m.*", "m.room.message", false));
        assert!(matches("*", "", false));
        assert!(matches("m.room.*age", "m.room.message", false));
        assert!(!matches("m.room.*age", "m.room.member", false));
        assert!(!matches("m.room.member", "m.room.member2", false));
        assert!(matches("é*ü", "éxyzü", false));
        assert!(!matches("a?c", "abc", false));
        assert!(matches("a?c", "a?c", false));
        assert!(matches("a?c", "abc", true));
        let g = Glob::new("cake*lie");
        assert!(g.is_match("cakeisalie"));
        assert!(!g.is_match("cakeisalies"));
        assert!(Glob::new("lie").is_match_words("the cake is a lie!"));
        assert!(!Glob::new("lie").is_match_words("the cake is a lies"));
        assert!(Glob::new("li?").is_match_words("a lie."));
        assert!(Glob::new("*").is_match_words(""));
        assert!(!Glob::new("").is_match_words("x"));
        assert!(Glob::new("").is_match(""));
        assert!(Glob::new(".foo").is_match_words("a.foo"));
        assert!(Glob::new("aa").is_match_words("aaa aa"));
        assert!(!Glob::new("aa").is_match_words("aaa"));
        let long = "ab".repeat(40);
        assert!(Glob::new(&long).is_match_words(&format!("x{long} {long}")));
        assert!(!Glob::new(&long).is_match_words(&format!("x{long}")));
    }

    #[test]
    fn adversarial_patterns_are_fast() {
        let started = std::time::Instant::now();
        let value = "a".repeat(10_000);
        let stars = format!("{}b", "*a".repeat(20));
        assert!(!matches(&stars, &value, true));
        assert!(!Glob::new(&stars).is_match(&value));
        assert!(!Glob::new(&stars).is_match_words(&value));
        let questions = "?".repeat(10_000);
        assert!(Glob::new(&questions).is_match(&value));
        assert!(Glob::new(&questions).is_match_words(&value));
        assert!(!Glob::new(&"?".repeat(100_000)).is_match_words(&value));
        assert!(Glob::new(&"*".repeat(20_000)).is_match_words(&value));
        assert!(started.elapsed().as_secs() < 3, "{:?}", started.elapsed());
    }

    fn small() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[ab*?. é_]{0,8}").unwrap()
    }

    proptest! {
        #[test]
        fn agrees_with_the_reference(p in small(), v in small(), q in any::<bool>()) {
            let (pc, vc): (Vec<char>, Vec<char>) = (p.chars().collect(), v.chars().collect());
            prop_assert_eq!(matches(&p, &v, q), reference(&pc, &vc, q));
            prop_assert_eq!(Glob::new(&p).is_match(&v), reference(&pc, &vc, true));
            prop_assert_eq!(Glob::new(&p).is_match_words(&v), reference_words(&p, &v));
        }

        #[test]
        fn never_panics_on_any_unicode(p in any::<String>(), v in any::<String>(), q in any::<bool>()) {
            let _ = matches(&p, &v, q);
            let g = Glob::new(&p);
            let _ = g.is_match(&v);
            let _ = g.is_match_words(&v);
        }

        #[test]
        fn adversarial_shapes_terminate_fast(n in 1usize..40, len in 0usize..4000, c in "[a-w]") {
            let value = c.repeat(len);
            let pattern = format!("{}x", format!("*{c}").repeat(n));
            let started = std::time::Instant::now();
            prop_assert!(!matches(&pattern, &value, true));
            prop_assert!(!Glob::new(&pattern).is_match_words(&value));
            prop_assert!(started.elapsed().as_millis() < 500);
        }
    }
}
