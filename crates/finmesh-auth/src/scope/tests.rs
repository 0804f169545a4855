//! Scope parsing, the access table, `includes`, and properties against a
//! brute-force model of subject matching.

use finmesh_core::{BucketName, StreamName, Subject, SubjectPattern};
use proptest::prelude::*;

use super::*;
use crate::{Access, Principal};

fn sc(s: &str) -> Scope {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}
fn b(s: &str) -> BucketName {
    BucketName::new(s).unwrap()
}
fn st(s: &str) -> StreamName {
    StreamName::new(s).unwrap()
}
fn subj(s: &str) -> Subject {
    Subject::new(s).unwrap()
}
fn pat(s: &str) -> SubjectPattern {
    SubjectPattern::new(s).unwrap()
}

#[test]
fn parses_and_round_trips_every_form() {
    for s in [
        "admin",
        "kv:read:cards",
        "kv:write:*",
        "kv:admin:cards",
        "stream:publish:md",
        "stream:publish:md:md.>",
        "stream:subscribe:*:md.*.EURUSD",
        "stream:consume:orders",
        "stream:admin:*",
        "stream:publish:md:a:b.c",
        "subscribers:read",
    ] {
        assert_eq!(sc(s).to_string(), s);
    }
    assert_eq!(
        sc("stream:publish:md:a:b.c"),
        Scope::Stream {
            action: StreamAction::Publish,
            stream: NameMatch::Exact(st("md")),
            subjects: Some(pat("a:b.c"))
        }
    );
}

#[test]
fn rejects_malformed_scopes() {
    for s in [
        "",
        "Admin",
        "admin:x",
        "kv",
        "kv:read",
        "kv:read:",
        "kv:delete:cards",
        "kv:read:cards:x.>",
        "kv:read:ca.rds",
        "stream:publish:md:",
        "stream:publish:md:a..b",
        "stream:publish:md:a.>.b",
        "stream:consume:md:x",
        "stream:admin:md:>",
        "stream:watch:md",
        "openid",
        "stream:publish:m*",
        "subscribers:write",
        "subscribers:read:x",
    ] {
        let e = s.parse::<Scope>().unwrap_err();
        assert_eq!(e.kind(), finmesh_core::ErrorKind::Invalid, "{s}");
    }
    let long = format!("stream:publish:md:{}", "a.".repeat(MAX_SCOPE_LEN));
    assert!(long.parse::<Scope>().is_err());
}

#[test]
fn admin_grants_everything() {
    let p = Principal::admin("root");
    let (bk, s, sub, f) = (b("cards"), st("md"), subj("md.x"), pat(">"));
    for a in [
        Access::Admin,
        Access::KvRead { bucket: &bk },
        Access::KvWrite { bucket: &bk },
        Access::KvAdmin { bucket: &bk },
        Access::StreamPublish { stream: &s, subject: &sub },
        Access::StreamSubscribe { stream: &s, filter: None },
        Access::StreamSubscribe { stream: &s, filter: Some(&f) },
        Access::StreamConsume { stream: &s },
        Access::StreamAdmin { stream: &s },
    ] {
        assert!(p.allows(&a), "{a:?}");
    }
}

#[test]
fn kv_scopes_are_per_bucket_and_per_action() {
    let p = Principal::new("app", vec!["kv:read:cards".into(), "kv:write:tokens".into()]);
    let (cards, tokens, other) = (b("cards"), b("tokens"), b("other"));
    assert!(p.allows(&Access::KvRead { bucket: &cards }));
    assert!(!p.allows(&Access::KvWrite { bucket: &cards }));
    assert!(!p.allows(&Access::KvAdmin { bucket: &cards }));
    assert!(p.allows(&Access::KvWrite { bucket: &tokens }));
    assert!(!p.allows(&Access::KvRead { bucket: &tokens }), "write does not imply read");
    assert!(!p.allows(&Access::KvRead { bucket: &other }));
    assert!(!p.allows(&Access::Admin));

    let any = Principal::new("ops", vec!["kv:admin:*".into()]);
    assert!(any.allows(&Access::KvAdmin { bucket: &other }));
    assert!(!any.allows(&Access::KvRead { bucket: &other }));
    assert!(!any.allows(&Access::Admin), "kv:admin:* is not admin");
}

#[test]
fn subscribe_with_pattern_grants_covered_filters_only() {
    let p = Principal::new("feed", vec!["stream:subscribe:md:md.>".into()]);
    let (md, fx) = (st("md"), st("fx"));
    let allows = |p: &Principal, f: Option<&str>| {
        let f = f.map(pat);
        p.allows(&Access::StreamSubscribe { stream: &md, filter: f.as_ref() })
    };
    assert!(allows(&p, Some("md.eq.*")));
    assert!(allows(&p, Some("md.>")));
    assert!(allows(&p, Some("md.eu.EURUSD")));
    assert!(!allows(&p, Some("fx.>")));
    assert!(!allows(&p, Some(">")));
    assert!(!allows(&p, Some("*.eq")), "`*.eq` matches `fx.eq` too");
    assert!(!allows(&p, None), "no filter = every subject, which md.> does not cover");
    assert!(!p.allows(&Access::StreamSubscribe { stream: &fx, filter: Some(&pat("md.>")) }));
    assert!(!p.allows(&Access::StreamPublish { stream: &md, subject: &subj("md.x") }));
    assert!(!p.allows(&Access::StreamConsume { stream: &md }));

    let all = Principal::new("feed", vec!["stream:subscribe:md".into()]);
    assert!(allows(&all, None));
    let gt = Principal::new("feed", vec!["stream:subscribe:md:>".into()]);
    assert!(allows(&gt, None));
}

#[test]
fn publish_with_pattern_grants_matching_subjects() {
    let p = Principal::new("pricer", vec!["stream:publish:*:md.*.EURUSD".into()]);
    let (md, other) = (st("md"), st("other"));
    assert!(p.allows(&Access::StreamPublish { stream: &md, subject: &subj("md.eu.EURUSD") }));
    assert!(p.allows(&Access::StreamPublish { stream: &other, subject: &subj("md.us.EURUSD") }));
    assert!(!p.allows(&Access::StreamPublish { stream: &md, subject: &subj("md.eu.GBPUSD") }));
    assert!(!p.allows(&Access::StreamPublish { stream: &md, subject: &subj("md.eu.x.EURUSD") }));
    assert!(!p.allows(&Access::StreamAdmin { stream: &md }));
}

#[test]
fn consume_and_admin_are_per_stream() {
    let p = Principal::new("worker", vec!["stream:consume:orders".into(), "stream:admin:scratch".into()]);
    let (orders, scratch) = (st("orders"), st("scratch"));
    assert!(p.allows(&Access::StreamConsume { stream: &orders }));
    assert!(!p.allows(&Access::StreamConsume { stream: &scratch }));
    assert!(p.allows(&Access::StreamAdmin { stream: &scratch }));
    assert!(!p.allows(&Access::StreamAdmin { stream: &orders }));
}

#[test]
fn unknown_scopes_are_kept_but_grant_nothing() {
    let p = Principal::new("x", vec!["openid".into(), "kv:read:cards".into(), "kv:read:bad name".into()]);
    assert_eq!(p.scopes().len(), 3);
    assert_eq!(p.grants(), &[sc("kv:read:cards")]);
    let nobody = Principal::new("x", vec!["Admin".into(), "admin ".into()]);
    assert!(!nobody.allows(&Access::Admin));
}

#[test]
fn includes_follows_names_and_patterns() {
    assert!(sc("admin").includes(&sc("kv:read:x")));
    assert!(!sc("kv:read:*").includes(&sc("admin")));
    assert!(sc("kv:read:*").includes(&sc("kv:read:x")));
    assert!(!sc("kv:read:x").includes(&sc("kv:read:*")));
    assert!(!sc("kv:read:x").includes(&sc("kv:write:x")));
    assert!(sc("stream:subscribe:md:md.>").includes(&sc("stream:subscribe:md:md.eu.>")));
    assert!(!sc("stream:subscribe:md:md.>").includes(&sc("stream:subscribe:md")));
    assert!(sc("stream:subscribe:md").includes(&sc("stream:subscribe:md:md.>")));
    assert!(sc("stream:subscribe:md:>").includes(&sc("stream:subscribe:md")));
    assert!(!sc("stream:subscribe:md").includes(&sc("stream:publish:md")));
}

#[test]
fn scope_lists() {
    let l = parse_scope_list("  kv:read:a\tstream:consume:s  ").unwrap();
    assert_eq!(format_scope_list(&l), "kv:read:a stream:consume:s");
    assert!(parse_scope_list("").unwrap().is_empty());
    assert!(parse_scope_list("kv:read:a nope").is_err());
}

// Properties over a small alphabet, so that random patterns often relate.

fn token() -> impl Strategy<Value = String> {
    prop_oneof![Just("a".to_owned()), Just("b".to_owned()), Just("c".to_owned())]
}

fn subject_strategy() -> impl Strategy<Value = String> {
    proptest::collection::vec(token(), 1..4).prop_map(|t| t.join("."))
}

fn pattern_strategy() -> impl Strategy<Value = String> {
    (proptest::collection::vec(prop_oneof![3 => token(), 1 => Just("*".to_owned())], 0..4), any::<bool>()).prop_map(
        |(mut t, tail)| {
            if tail || t.is_empty() {
                t.push(">".to_owned());
            }
            t.join(".")
        },
    )
}

/// Every subject over the alphabet with 1..=4 tokens: the brute-force model.
fn universe() -> Vec<Subject> {
    let mut all = vec![];
    let mut layer: Vec<String> = vec![String::new()];
    for _ in 0..4 {
        let mut next = vec![];
        for prefix in &layer {
            for t in ["a", "b", "c"] {
                let s = if prefix.is_empty() { t.to_owned() } else { format!("{prefix}.{t}") };
                all.push(subj(&s));
                next.push(s);
            }
        }
        layer = next;
    }
    all
}

proptest! {
    /// A granted subscribe filter never lets through a subject the scope's
    /// pattern would refuse to publish-match.
    #[test]
    fn subscribe_grant_is_sound(scope_pat in pattern_strategy(), filter in pattern_strategy()) {
        let md = st("md");
        let p = Principal::new("x", vec![format!("stream:subscribe:md:{scope_pat}")]);
        let (sp, fp) = (pat(&scope_pat), pat(&filter));
        if p.allows(&Access::StreamSubscribe { stream: &md, filter: Some(&fp) }) {
            for s in universe() {
                if fp.matches(&s) {
                    prop_assert!(sp.matches(&s), "{filter} granted under {scope_pat} but {s} escapes");
                }
            }
        }
    }

    /// Publish grants exactly what the pattern matches.
    #[test]
    fn publish_grant_is_matching(scope_pat in pattern_strategy(), subject in subject_strategy()) {
        let md = st("md");
        let p = Principal::new("x", vec![format!("stream:publish:md:{scope_pat}")]);
        let s = subj(&subject);
        prop_assert_eq!(p.allows(&Access::StreamPublish { stream: &md, subject: &s }), pat(&scope_pat).matches(&s));
    }

    /// `includes` is sound: whatever the narrower scope grants, the wider does.
    #[test]
    fn includes_is_sound(wide in pattern_strategy(), narrow in pattern_strategy(), filter in pattern_strategy()) {
        let md = st("md");
        let w = sc(&format!("stream:subscribe:md:{wide}"));
        let n = sc(&format!("stream:subscribe:md:{narrow}"));
        let f = pat(&filter);
        let access = Access::StreamSubscribe { stream: &md, filter: Some(&f) };
        if w.includes(&n) && n.grants(&access) {
            prop_assert!(w.grants(&access));
        }
    }

    /// Parsing never panics, and whatever parses round-trips.
    #[test]
    fn parse_is_total(s in "[a-z:*>. ]{0,40}") {
        if let Ok(scope) = s.parse::<Scope>() {
            prop_assert_eq!(scope.to_string().parse::<Scope>().unwrap(), scope);
        }
    }
}

#[test]
fn subscribers_read_grants_only_the_registry_reads() {
    let p = Principal::new("ops", vec!["subscribers:read".into()]);
    assert!(p.allows(&Access::SubscribersRead));
    assert!(!p.allows(&Access::Admin), "reading the registry is not writing it");
    assert!(Principal::admin("root").allows(&Access::SubscribersRead));
    assert!(!Principal::new("app", vec!["kv:read:*".into()]).allows(&Access::SubscribersRead));
    assert!(sc("admin").includes(&sc("subscribers:read")));
    assert!(!sc("subscribers:read").includes(&sc("admin")));
}
