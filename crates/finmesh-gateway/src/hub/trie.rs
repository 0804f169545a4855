//! A subject trie: subscriber ids filed under their filter pattern, found
//! by walking a message's subject once instead of matching every
//! subscriber's pattern against it.
//!
//! Patterns are NATS-style: tokens separated by `.`, `*` matches exactly one
//! token, `>` (last token only) matches one or more. A subscriber without a
//! filter is filed under `>` (every subject has at least one token).
//!
//! Invariants:
//! - a node exists only while an id is filed at or below it (removal prunes);
//! - [`SubjectTrie::matches`] visits each matching id exactly once per filing
//!   (an id is filed once per subscription, so once in all).

use std::collections::HashMap;

/// Ids filed by pattern.
#[derive(Debug, Default)]
pub struct SubjectTrie {
    root: Node,
    len: usize,
}

#[derive(Debug, Default)]
struct Node {
    /// Children by literal token.
    literal: HashMap<Box<str>, Node>,
    /// The `*` child.
    star: Option<Box<Node>>,
    /// Ids whose pattern ends with `>` here.
    rest: Vec<u64>,
    /// Ids whose pattern ends exactly here.
    here: Vec<u64>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.star.is_none() && self.rest.is_empty() && self.here.is_empty()
    }
}

impl SubjectTrie {
    /// File `id` under `pattern` (a validated subject pattern).
    pub fn insert(&mut self, pattern: &str, id: u64) {
        let mut node = &mut self.root;
        for token in pattern.split('.') {
            match token {
                ">" => {
                    node.rest.push(id);
                    self.len += 1;
                    return;
                }
                "*" => node = node.star.get_or_insert_with(Box::default),
                lit => node = node.literal.entry(lit.into()).or_default(),
            }
        }
        node.here.push(id);
        self.len += 1;
    }

    /// Remove `id` filed under `pattern`; whether it was there.
    pub fn remove(&mut self, pattern: &str, id: u64) -> bool {
        let tokens: Vec<&str> = pattern.split('.').collect();
        let removed = remove_in(&mut self.root, &tokens, id);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Ids filed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is filed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append to `out` every id whose pattern matches `subject`.
    pub fn matches(&self, subject: &str, out: &mut Vec<u64>) {
        let tokens: Vec<&str> = subject.split('.').collect();
        walk(&self.root, &tokens, out);
    }
}

fn walk(node: &Node, tokens: &[&str], out: &mut Vec<u64>) {
    let Some((first, rest)) = tokens.split_first() else {
        out.extend_from_slice(&node.here);
        return;
    };
    out.extend_from_slice(&node.rest);
    if let Some(child) = node.literal.get(*first) {
        walk(child, rest, out);
    }
    if let Some(child) = &node.star {
        walk(child, rest, out);
    }
}

fn remove_in(node: &mut Node, tokens: &[&str], id: u64) -> bool {
    let take = |ids: &mut Vec<u64>| match ids.iter().position(|x| *x == id) {
        Some(i) => {
            ids.swap_remove(i);
            true
        }
        None => false,
    };
    match tokens.split_first() {
        None => take(&mut node.here),
        Some((&">", _)) => take(&mut node.rest),
        Some((&"*", rest)) => {
            let Some(child) = node.star.as_deref_mut() else { return false };
            let removed = remove_in(child, rest, id);
            if child.is_empty() {
                node.star = None;
            }
            removed
        }
        Some((lit, rest)) => {
            let Some(child) = node.literal.get_mut(*lit) else { return false };
            let removed = remove_in(child, rest, id);
            if child.is_empty() {
                node.literal.remove(*lit);
            }
            removed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use finmesh_core::{Subject, SubjectPattern};
    use proptest::prelude::*;

    fn matched(t: &SubjectTrie, subject: &str) -> Vec<u64> {
        let mut out = Vec::new();
        t.matches(subject, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn wildcards_match_as_nats_does() {
        let mut t = SubjectTrie::default();
        t.insert("md.eu.x", 1);
        t.insert("md.*.x", 2);
        t.insert("md.>", 3);
        t.insert(">", 4);
        t.insert("md", 5);
        assert_eq!(matched(&t, "md.eu.x"), vec![1, 2, 3, 4]);
        assert_eq!(matched(&t, "md.us.x"), vec![2, 3, 4]);
        assert_eq!(matched(&t, "md"), vec![4, 5]);
        assert_eq!(matched(&t, "md.eu"), vec![3, 4]);
        assert!(t.remove("md.*.x", 2));
        assert!(!t.remove("md.*.x", 2), "removed once");
        assert_eq!(matched(&t, "md.us.x"), vec![3, 4]);
        for (p, id) in [("md.eu.x", 1), ("md.>", 3), (">", 4), ("md", 5)] {
            assert!(t.remove(p, id));
        }
        assert!(t.is_empty() && t.root.is_empty(), "removal prunes every node");
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_owned()), Just("b".to_owned()), Just("c".to_owned())]
    }

    fn pattern() -> impl Strategy<Value = String> {
        (prop::collection::vec(prop_oneof![3 => token(), 1 => Just("*".to_owned())], 1..4), any::<bool>()).prop_map(
            |(mut toks, gt)| {
                if gt {
                    toks.push(">".to_owned());
                }
                toks.join(".")
            },
        )
    }

    proptest! {
        /// The trie finds exactly the ids whose pattern `SubjectPattern::matches` the subject.
        #[test]
        fn agrees_with_pattern_matching(patterns in prop::collection::vec(pattern(), 0..12),
                                        subjects in prop::collection::vec(prop::collection::vec(token(), 1..5), 1..8)) {
            let mut t = SubjectTrie::default();
            for (i, p) in patterns.iter().enumerate() {
                t.insert(p, i as u64);
            }
            for s in subjects {
                let s = s.join(".");
                let subject = Subject::new(s.clone()).unwrap();
                let want: Vec<u64> = patterns.iter().enumerate()
                    .filter(|(_, p)| SubjectPattern::new((*p).clone()).unwrap().matches(&subject))
                    .map(|(i, _)| i as u64).collect();
                prop_assert_eq!(matched(&t, &s), want);
            }
        }
    }
}
