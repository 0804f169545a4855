//! Realistic risk-feed files for tests, demos and benchmarks.
//!
//! Owns the sample feed's shape (the columns of `examples/pipeline/risk.avsc`
//! in [`COLUMNS`] order), its reference data ([`CURRENCIES`], the same list
//! as `examples/pipeline/currencies.csv`; the books of [`books_csv`], the
//! same list as `examples/pipeline/books.csv`) and the injection of defects:
//! - *bad rows* ([`BadKind`]) do not fit the schema and must become ingest
//!   exceptions: an unparseable number, an impossible or misformatted date,
//!   an empty required field, a row with a missing field;
//! - *rule-failing rows* ([`RuleFail`]) fit the schema but break one of the
//!   four issue rules of `examples/pipeline/rules.txt`: notional `<= 0`, a
//!   currency not in the reference data, a maturity outside
//!   `[2020-01-01, 2080-12-31]`, a null counterparty or a desk other than
//!   RATES and FX (the rule is `counterparty NOT NULL AND desk IN (RATES, FX)`).
//!
//! Invariants: output is a pure function of [`GenOptions`] (same options,
//! same bytes); every defective row carries exactly one defect, so the
//! counts in [`GenSummary`] are what ingest and validation must find; good
//! rows pass every rule of `examples/pipeline/rules.txt` (so they are all
//! RATES or FX rows with a counterparty, FX rows trade a major currency,
//! `trade_date <= as_of < maturity`, `version >= 1`, a price is null or
//! positive; CREDIT and EQ rows appear only as failures of the fourth rule),
//! and a rule-failing row breaks its one rule and no other rule of that file.

use std::io::{self, Write};

/// Header of generated files, in order (the field order of `risk.avsc`).
pub const COLUMNS: [&str; 17] = [
    "trade_id",
    "book",
    "desk",
    "counterparty",
    "ccy",
    "notional",
    "price",
    "quantity",
    "trade_date",
    "maturity",
    "as_of",
    "pv",
    "delta",
    "gamma",
    "vega",
    "version",
    "is_cleared",
];

/// ISO 4217 codes and minor units of the sample reference data.
pub const CURRENCIES: [(&str, &str, u8); 20] = [
    ("USD", "US Dollar", 2),
    ("EUR", "Euro", 2),
    ("GBP", "Pound Sterling", 2),
    ("JPY", "Yen", 0),
    ("CHF", "Swiss Franc", 2),
    ("CAD", "Canadian Dollar", 2),
    ("AUD", "Australian Dollar", 2),
    ("NZD", "New Zealand Dollar", 2),
    ("SEK", "Swedish Krona", 2),
    ("NOK", "Norwegian Krone", 2),
    ("DKK", "Danish Krone", 2),
    ("HKD", "Hong Kong Dollar", 2),
    ("SGD", "Singapore Dollar", 2),
    ("CNY", "Yuan Renminbi", 2),
    ("INR", "Indian Rupee", 2),
    ("BRL", "Brazilian Real", 2),
    ("MXN", "Mexican Peso", 2),
    ("ZAR", "Rand", 2),
    ("PLN", "Zloty", 2),
    ("KRW", "Won", 0),
];

/// Codes that are not in [`CURRENCIES`].
const UNKNOWN_CURRENCIES: [&str; 4] = ["XYZ", "ABC", "EURO", "US$"];

/// The desks of `risk.avsc`, in symbol order.
pub const DESKS: [&str; 4] = ["RATES", "FX", "CREDIT", "EQ"];

/// Books are `<desk>-01` ..= `<desk>-<BOOKS_PER_DESK>`.
pub const BOOKS_PER_DESK: u8 = 24;

/// The currencies an FX row may trade (`fx_major_ccy` in `rules.txt`).
const FX_MAJORS: usize = 5;

const COUNTERPARTIES: [&str; 12] = [
    "Northwind Bank plc",
    "Contoso Capital LLC",
    "Banco Austral, S.A.",
    "Helvetia Privatbank AG",
    "O\"Neill & Partners",
    "Kaito Securities Co., Ltd.",
    "Fjord Pensjon ASA",
    "Maple Leaf Asset Management",
    "Société Générale de Test",
    "Ganges Infrastructure Fund",
    "Rand Mining Pension Trust",
    "Pacific Rim Insurance",
];

/// A defect that makes a row an ingest exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BadKind {
    /// `notional`, `pv` or a sensitivity that is not a number.
    UnparseableNumber,
    /// `maturity` or `trade_date` that is not a valid `YYYY-MM-DD` date.
    BadDate,
    /// An empty `trade_id`, `desk`, `notional` or `trade_date`.
    MissingRequired,
    /// A row with one field too few.
    MissingField,
}

/// A rule a row breaks while fitting the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleFail {
    NotionalNotPositive,
    UnknownCurrency,
    MaturityOutOfRange,
    CounterpartyNullOrDeskNotRatesFx,
}

/// Share of all rows (0.0..=1.0) that break each rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RuleFailShares {
    pub notional_not_positive: f64,
    pub unknown_currency: f64,
    pub maturity_out_of_range: f64,
    pub counterparty_null_or_desk_not_rates_fx: f64,
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenOptions {
    pub rows: u64,
    pub seed: u64,
    /// Share of all rows (0.0..=1.0) with a [`BadKind`] defect.
    pub bad_share: f64,
    pub rule_fail: RuleFailShares,
    /// The `as_of` of every row (RFC 3339, within 2024-01-01 ..= 2050-12-31 so
    /// that good rows pass `valued_recently` and can mature by 2080).
    pub as_of: String,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            rows: 1000,
            seed: 1,
            bad_share: 0.0,
            rule_fail: RuleFailShares::default(),
            as_of: "2026-12-01T18:00:00Z".into(),
        }
    }
}

/// What was generated: how many rows of each kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GenSummary {
    pub rows: u64,
    /// Rows that fit the schema and pass every rule.
    pub good: u64,
    /// Rows with a [`BadKind`] defect (ingest exceptions).
    pub bad: u64,
    pub unparseable_number: u64,
    pub bad_date: u64,
    pub missing_required: u64,
    pub missing_field: u64,
    /// Rows that fit the schema but break one rule.
    pub rule_fails: u64,
    pub notional_not_positive: u64,
    pub unknown_currency: u64,
    pub maturity_out_of_range: u64,
    pub counterparty_null_or_desk_not_rates_fx: u64,
    /// Bytes written.
    pub bytes: u64,
}

enum Kind {
    Good,
    Bad(BadKind),
    Rule(RuleFail),
}

/// Writes a header and `opts.rows` rows of CSV to `out`.
pub fn generate<W: Write>(out: W, opts: &GenOptions) -> io::Result<GenSummary> {
    let shares = [
        opts.bad_share,
        opts.rule_fail.notional_not_positive,
        opts.rule_fail.unknown_currency,
        opts.rule_fail.maturity_out_of_range,
        opts.rule_fail.counterparty_null_or_desk_not_rates_fx,
    ];
    if shares.iter().any(|s| !(0.0..=1.0).contains(s)) || shares.iter().sum::<f64>() > 1.0 + 1e-9 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("shares must each be in 0..=1 and add up to at most 1, got {shares:?}"),
        ));
    }
    let as_of_day = as_of_day(&opts.as_of)?;
    let mut counter = CountingWriter { inner: out, bytes: 0 };
    let mut w = csv::WriterBuilder::new().flexible(true).from_writer(&mut counter);
    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let mut s = GenSummary { rows: opts.rows, ..GenSummary::default() };
    w.write_record(COLUMNS)?;
    let mut cells: Vec<String> = Vec::with_capacity(COLUMNS.len());
    for row in 1..=opts.rows {
        let u = rng.f64();
        let mut acc = 0.0;
        let mut kind = Kind::Good;
        let kinds = [
            Kind::Bad(BadKind::UnparseableNumber), // placeholder: the bad kind is drawn below
            Kind::Rule(RuleFail::NotionalNotPositive),
            Kind::Rule(RuleFail::UnknownCurrency),
            Kind::Rule(RuleFail::MaturityOutOfRange),
            Kind::Rule(RuleFail::CounterpartyNullOrDeskNotRatesFx),
        ];
        for (share, k) in shares.iter().zip(kinds) {
            acc += share;
            if u < acc {
                kind = k;
                break;
            }
        }
        if let Kind::Bad(_) = kind {
            kind = Kind::Bad(match rng.u8(0..4) {
                0 => BadKind::UnparseableNumber,
                1 => BadKind::BadDate,
                2 => BadKind::MissingRequired,
                _ => BadKind::MissingField,
            });
        }
        good_row(&mut rng, row, &opts.as_of, as_of_day, &mut cells);
        match kind {
            Kind::Good => s.good += 1,
            Kind::Bad(b) => {
                s.bad += 1;
                spoil(&mut rng, b, &mut cells);
                match b {
                    BadKind::UnparseableNumber => s.unparseable_number += 1,
                    BadKind::BadDate => s.bad_date += 1,
                    BadKind::MissingRequired => s.missing_required += 1,
                    BadKind::MissingField => s.missing_field += 1,
                }
            }
            Kind::Rule(r) => {
                s.rule_fails += 1;
                break_rule(&mut rng, r, &mut cells);
                match r {
                    RuleFail::NotionalNotPositive => s.notional_not_positive += 1,
                    RuleFail::UnknownCurrency => s.unknown_currency += 1,
                    RuleFail::MaturityOutOfRange => s.maturity_out_of_range += 1,
                    RuleFail::CounterpartyNullOrDeskNotRatesFx => s.counterparty_null_or_desk_not_rates_fx += 1,
                }
            }
        }
        w.write_record(&cells)?;
    }
    w.flush()?;
    drop(w);
    s.bytes = counter.bytes;
    Ok(s)
}

struct CountingWriter<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Column indexes into [`COLUMNS`].
const TRADE_ID: usize = 0;
const BOOK: usize = 1;
const DESK: usize = 2;
const COUNTERPARTY: usize = 3;
const CCY: usize = 4;
const NOTIONAL: usize = 5;
const TRADE_DATE: usize = 8;
const MATURITY: usize = 9;
const PV: usize = 11;
const DELTA: usize = 12;

/// Days since 1970-01-01 of 2024-01-01, 2050-12-31 and 2080-12-31.
const AS_OF_MIN: i32 = 19_723;
const AS_OF_MAX: i32 = 29_584;
const MATURITY_MAX: i32 = 40_542;

/// The day (since 1970-01-01) of an RFC 3339 `as_of`, refused outside
/// [`AS_OF_MIN`] ..= [`AS_OF_MAX`].
fn as_of_day(as_of: &str) -> io::Result<i32> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, format!("as_of {as_of:?}: {why}"));
    let t = time::OffsetDateTime::parse(as_of, &time::format_description::well_known::Rfc3339)
        .map_err(|e| invalid(e.to_string()))?;
    let day = t.to_offset(time::UtcOffset::UTC).date().to_julian_day() - 2_440_588;
    if !(AS_OF_MIN..=AS_OF_MAX).contains(&day) {
        return Err(invalid("must be within 2024-01-01 ..= 2050-12-31".into()));
    }
    Ok(day)
}

fn date(days_since_epoch: i32) -> String {
    let d = time::Date::from_julian_day(days_since_epoch + 2_440_588).expect("generated dates are in range");
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

fn book(rng: &mut fastrand::Rng, desk: &str) -> String {
    format!("{desk}-{:02}", rng.u8(1..=BOOKS_PER_DESK))
}

fn good_row(rng: &mut fastrand::Rng, row: u64, as_of: &str, as_of_day: i32, cells: &mut Vec<String>) {
    cells.clear();
    // The rules let only RATES and FX rows with a counterparty pass.
    let fx = rng.bool();
    let desk = DESKS[usize::from(fx)];
    let counterparty = COUNTERPARTIES[rng.usize(0..COUNTERPARTIES.len())].to_string();
    // FX rows trade the majors only; RATES rows are weighted towards them.
    let ccy = if fx || rng.bool() {
        CURRENCIES[rng.usize(0..FX_MAJORS)].0
    } else {
        CURRENCIES[rng.usize(0..CURRENCIES.len())].0
    };
    let notional_units = 10u64.pow(rng.u32(3..9)) * rng.u64(1..10);
    let notional_cents = if rng.u8(0..4) == 0 { rng.u64(0..100) } else { 0 };
    let notional = notional_units as f64;
    // RATES: bonds quoted in percent of par, swaps without a price; FX: the
    // forward rate. Six decimal places, always positive.
    let price_micros = match (fx, rng.bool()) {
        (false, false) => None,
        (false, true) => Some(rng.u64(90_000_000..=110_000_000)),
        (true, _) => Some(rng.u64(500_000..=2_000_000)),
    };
    let quantity = if fx { 1 } else { rng.u64(1..=50) };
    // Traded in the last ten years, matures after the valuation day.
    let trade_date = as_of_day - rng.i32(0..=3_650);
    let maturity = (as_of_day + rng.i32(30..=30 * 365)).min(MATURITY_MAX);
    let pv = (rng.f64() - 0.5) * 0.1 * notional;
    let delta = (rng.f64() - 0.5) * notional * 1e-4;
    // A third of FX rows are forwards: linear, no gamma or vega.
    let linear = fx && rng.u8(0..3) == 0;
    let gamma = (rng.f64() - 0.5) * notional * 1e-7;
    let vega = rng.f64() * notional * 1e-5;
    // Mostly new trades, some amended.
    let version = if rng.u8(0..10) < 7 { 1 } else { rng.u8(2..=5) };
    // Swaps are mostly cleared, FX mostly bilateral.
    let cleared = if fx { rng.u8(0..10) == 0 } else { rng.u8(0..10) < 8 };
    cells.push(format!("TRD-{row:010}"));
    cells.push(book(rng, desk));
    cells.push(desk.to_string());
    cells.push(counterparty);
    cells.push(ccy.to_string());
    cells.push(format!("{notional_units}.{notional_cents:02}"));
    cells.push(price_micros.map_or(String::new(), |p| format!("{}.{:06}", p / 1_000_000, p % 1_000_000)));
    cells.push(quantity.to_string());
    cells.push(date(trade_date));
    cells.push(date(maturity));
    cells.push(as_of.to_string());
    cells.push(format!("{pv:.2}"));
    cells.push(format!("{delta:.6}"));
    cells.push(if linear { String::new() } else { format!("{gamma:.8}") });
    cells.push(if linear { String::new() } else { format!("{vega:.4}") });
    cells.push(version.to_string());
    cells.push(cleared.to_string());
}

fn spoil(rng: &mut fastrand::Rng, kind: BadKind, cells: &mut Vec<String>) {
    match kind {
        BadKind::UnparseableNumber => {
            let (col, text) = match rng.u8(0..4) {
                0 => (NOTIONAL, "1O000.00"),
                1 => (NOTIONAL, "12 500.00"),
                2 => (PV, "n/a"),
                _ => (DELTA + rng.usize(0..3), "#VALUE!"),
            };
            cells[col] = text.to_string();
        }
        BadKind::BadDate => {
            let col = if rng.bool() { MATURITY } else { TRADE_DATE };
            cells[col] = ["2031-02-30", "31/12/2031", "2031-13-01", "20310101"][rng.usize(0..4)].to_string();
        }
        BadKind::MissingRequired => {
            let col = [TRADE_ID, DESK, NOTIONAL, TRADE_DATE][rng.usize(0..4)];
            cells[col].clear();
        }
        BadKind::MissingField => {
            cells.remove(rng.usize(0..cells.len()));
        }
    }
}

fn break_rule(rng: &mut fastrand::Rng, rule: RuleFail, cells: &mut [String]) {
    match rule {
        RuleFail::NotionalNotPositive => {
            cells[NOTIONAL] = if rng.bool() { "0.00".into() } else { format!("-{}.00", rng.u32(1..1_000_000)) };
        }
        RuleFail::UnknownCurrency => {
            // On a RATES row: an FX row would also break `fx_major_ccy`.
            if cells[DESK] != "RATES" {
                cells[DESK] = "RATES".into();
                cells[BOOK] = book(rng, "RATES");
            }
            cells[CCY] = UNKNOWN_CURRENCIES[rng.usize(0..UNKNOWN_CURRENCIES.len())].to_string();
        }
        RuleFail::MaturityOutOfRange => {
            // 1990-01-01..=2019-12-31 (traded before it matured, so
            // `matures_after_trade` still holds) or 2081-01-01..=2099-12-31.
            if rng.bool() {
                let maturity = rng.i32(7_305..=18_261);
                cells[MATURITY] = date(maturity);
                cells[TRADE_DATE] = date(maturity - rng.i32(30..=3_650));
            } else {
                cells[MATURITY] = date(rng.i32(40_543..=47_481));
            }
        }
        RuleFail::CounterpartyNullOrDeskNotRatesFx => {
            // A null counterparty, another desk, or both.
            let (null, other_desk) = match rng.u8(0..3) {
                0 => (true, false),
                1 => (false, true),
                _ => (true, true),
            };
            if null {
                cells[COUNTERPARTY].clear();
            }
            if other_desk {
                let desk = DESKS[2 + rng.usize(0..2)];
                cells[DESK] = desk.to_string();
                cells[BOOK] = book(rng, desk);
            }
        }
    }
}

/// The options of `examples/pipeline/risk-sample.csv`: 60 rows, about one
/// in ten bad and one in twenty failing each rule.
pub fn sample_options() -> GenOptions {
    GenOptions {
        rows: 60,
        seed: 20_261_202,
        bad_share: 0.1,
        rule_fail: RuleFailShares {
            notional_not_positive: 0.05,
            unknown_currency: 0.05,
            maturity_out_of_range: 0.05,
            counterparty_null_or_desk_not_rates_fx: 0.05,
        },
        ..GenOptions::default()
    }
}

/// `examples/pipeline/currencies.csv`: the reference data of [`CURRENCIES`].
pub fn currencies_csv() -> String {
    let mut s = String::from("ccy,name,minor_units\n");
    for (code, name, minor) in CURRENCIES {
        s.push_str(&format!("{code},{name},{minor}\n"));
    }
    s
}

/// `examples/pipeline/books.csv`: every book the generator writes, with its desk.
pub fn books_csv() -> String {
    let mut s = String::from("book,desk\n");
    for desk in DESKS {
        for n in 1..=BOOKS_PER_DESK {
            s.push_str(&format!("{desk}-{n:02},{desk}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_options_same_bytes_and_seed_changes_them() {
        let opts = GenOptions { rows: 500, seed: fastrand::u64(..), bad_share: 0.1, ..GenOptions::default() };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let sa = generate(&mut a, &opts).unwrap();
        let sb = generate(&mut b, &opts).unwrap();
        assert_eq!(a, b);
        assert_eq!(sa, sb);
        assert_eq!(sa.bytes, a.len() as u64);
        let mut c = Vec::new();
        generate(&mut c, &GenOptions { seed: opts.seed.wrapping_add(1), ..opts }).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn shares_out_of_range_are_refused() {
        let e = generate(
            Vec::new(),
            &GenOptions {
                bad_share: 0.7,
                rule_fail: RuleFailShares { unknown_currency: 0.4, ..Default::default() },
                ..GenOptions::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(generate(Vec::new(), &GenOptions { bad_share: -0.1, ..GenOptions::default() }).is_err());
        for as_of in ["yesterday", "2023-12-31T23:59:59Z", "2051-01-01T00:00:00Z"] {
            let e = generate(Vec::new(), &GenOptions { as_of: as_of.into(), ..GenOptions::default() }).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{as_of}");
            assert!(e.to_string().contains(as_of), "{e}");
        }
    }

    #[test]
    fn good_rows_have_realistic_dates_versions_and_prices() {
        let opts = GenOptions { rows: 2_000, seed: fastrand::u64(..), ..GenOptions::default() };
        let mut csv = Vec::new();
        generate(&mut csv, &opts).unwrap();
        let mut r = csv::Reader::from_reader(&csv[..]);
        assert_eq!(r.headers().unwrap().iter().collect::<Vec<_>>(), COLUMNS);
        let as_of = "2026-12-01";
        let (mut linear, mut priced, mut unpriced) = (0, 0, 0);
        for row in r.records() {
            let row = row.unwrap();
            let (trade_date, maturity) = (&row[TRADE_DATE], &row[MATURITY]);
            assert!(trade_date <= as_of && as_of < maturity && maturity <= "2080-12-31", "seed {}: {row:?}", opts.seed);
            assert!(row[15].parse::<u8>().unwrap() >= 1);
            assert!(row[7].parse::<u64>().unwrap() >= 1);
            if row[DESK] == *"FX" {
                assert!(CURRENCIES[..FX_MAJORS].iter().any(|c| c.0 == &row[CCY]), "{row:?}");
            }
            if row[13].is_empty() {
                assert_eq!((&row[DESK], &row[14]), ("FX", ""));
                linear += 1;
            }
            match &row[6] {
                "" => unpriced += 1,
                p => {
                    assert!(p.parse::<f64>().unwrap() > 0.0);
                    priced += 1;
                }
            }
            assert!(row[BOOK].starts_with(&row[DESK]));
        }
        assert!(linear > 0 && priced > 0 && unpriced > 0, "{linear} {priced} {unpriced}");
    }

    #[test]
    fn shares_are_met_within_sampling_error() {
        let opts = GenOptions {
            rows: 20_000,
            seed: fastrand::u64(..),
            bad_share: 0.05,
            rule_fail: RuleFailShares {
                notional_not_positive: 0.02,
                unknown_currency: 0.03,
                maturity_out_of_range: 0.01,
                counterparty_null_or_desk_not_rates_fx: 0.04,
            },
            ..GenOptions::default()
        };
        let s = generate(io::sink(), &opts).unwrap();
        assert_eq!(s.good + s.bad + s.rule_fails, s.rows);
        assert_eq!(s.bad, s.unparseable_number + s.bad_date + s.missing_required + s.missing_field);
        assert_eq!(
            s.rule_fails,
            s.notional_not_positive
                + s.unknown_currency
                + s.maturity_out_of_range
                + s.counterparty_null_or_desk_not_rates_fx
        );
        // 20,000 draws: 6 standard deviations of a 5% share is ~0.9%.
        let near = |n: u64, share: f64| ((n as f64 / 20_000.0) - share).abs() < 0.01;
        assert!(near(s.bad, 0.05), "{s:?}");
        assert!(near(s.notional_not_positive, 0.02), "{s:?}");
        assert!(near(s.unknown_currency, 0.03), "{s:?}");
        assert!(near(s.maturity_out_of_range, 0.01), "{s:?}");
        assert!(near(s.counterparty_null_or_desk_not_rates_fx, 0.04), "{s:?}");
    }
}
