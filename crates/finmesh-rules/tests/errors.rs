//! Error messages, as `finmesh pipeline rules check` prints them, pinned with
//! insta snapshots (`tests/snapshots/`). Each case also checks the error kind,
//! so a wording change and a behaviour change show up separately.

mod common;

use apache_avro::Schema;
use finmesh_rules::{ErrorKind, RuleSet, render_all};

/// Compiles `src` against the example schema and datasets; returns the kinds and the rendered errors.
fn errors(src: &str) -> (Vec<ErrorKind>, String) {
    let errors =
        RuleSet::compile(src, &common::risk_schema(), &common::datasets()).expect_err("rules must not compile");
    (errors.iter().map(|e| e.kind()).collect(), render_all(&errors, src, "rules.txt"))
}

macro_rules! error_case {
    ($name:ident, $src:expr, [$($kind:ident),+]) => {
        #[test]
        fn $name() {
            let (kinds, text) = errors($src);
            assert_eq!(kinds, [$(ErrorKind::$kind),+], "{text}");
            insta::assert_snapshot!(text);
        }
    };
}

error_case!(unknown_field_suggests_the_nearest, "rule notional_positive: notionl > 0\n", [UnknownField]);

error_case!(string_field_against_a_number, "rule r: ccy > 5\n", [TypeMismatch]);

error_case!(date_field_against_a_string, "rule maturity: maturity >= \"2020-01-01\"\n", [TypeMismatch]);

error_case!(unknown_dataset, "rule ccy_known: LOOKUP(currency, ccy)\n", [UnknownDataset]);

error_case!(lookup_key_of_the_wrong_type, "rule qty_known: LOOKUP(currencies, quantity)\n", [TypeMismatch]);

error_case!(
    duplicate_rule_name,
    "rule cpty: counterparty NOT NULL\n\n# again\nrule cpty: desk = \"FX\"\n",
    [DuplicateRule]
);

error_case!(
    missing_closing_parenthesis,
    "rule cpty: counterparty NOT NULL AND (desk = \"RATES\" OR desk = \"FX\"\n",
    [Syntax]
);

error_case!(double_equals, "rule r: version == 1\n", [Syntax]);

error_case!(c_style_and_is_reported_once, "rule r: notional > 0 && pv > 0\n", [Syntax]);

error_case!(not_after_a_value, "rule r: ccy NOT \"USD\"\n", [Syntax]);

error_case!(date_that_does_not_exist, "rule r: maturity IN RANGE [2020-02-30, 2080-12-31]\n", [InvalidLiteral]);

error_case!(unknown_enum_symbol, "rule r: desk = \"RATE\"\n", [UnknownSymbol]);

error_case!(empty_range, "rule maturity: maturity IN RANGE [2080-12-31, 2020-01-01]\n", [EmptyRange]);

error_case!(fraction_against_an_integer_field, "rule r: quantity > 0.5\n", [TypeMismatch]);

error_case!(ordering_an_enum, "rule r: desk < \"FX\"\n", [TypeMismatch]);

error_case!(comparison_with_null, "rule r: counterparty != NULL\n", [TypeMismatch]);

error_case!(number_alone_is_not_a_condition, "rule r: notional AND pv > 0\n", [TypeMismatch]);

error_case!(unterminated_string, "rule r: book = \"RATES-LDN-1\nrule s: pv > 0\n", [InvalidLiteral]);

error_case!(
    every_error_of_a_file_at_once,
    "# three broken rules and a good one\n\
     rule a: notional > 0 AND ccy = 3\n\
     rule b: LOOKUP(bookz, book)\n\
     rule c: maturity IN RANGE [2020-01-01 2080-12-31]\n\
     rule d: pv > 0\n",
    [TypeMismatch, UnknownDataset, Syntax]
);

#[test]
fn tabs_and_wide_characters_keep_the_caret_under_the_spot() {
    let src = "rule r:\n\tcounterparty = \"Société\" AND\tdesk = \"ΦX\"\n";
    let (kinds, text) = errors(src);
    assert_eq!(kinds, [ErrorKind::UnknownSymbol]);
    insta::assert_snapshot!(text);
}

/// `risk.avsc` has no array field (a CSV cell cannot carry one), but other
/// schemas may: rules refuse to compare one.
#[test]
fn array_field_compared() {
    let schema = Schema::parse_str(
        r#"{"type": "record", "name": "R", "fields": [{"name": "tags", "type": {"type": "array", "items": "string"}}]}"#,
    )
    .unwrap();
    let src = "rule r: tags = \"eod\"\n";
    let errors = RuleSet::compile(src, &schema, &common::datasets()).expect_err("rules must not compile");
    let text = render_all(&errors, src, "rules.txt");
    assert_eq!(errors.iter().map(|e| e.kind()).collect::<Vec<_>>(), [ErrorKind::UnsupportedField], "{text}");
    insta::assert_snapshot!(text);
}
