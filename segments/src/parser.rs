//! The segment language's parser. Errors say where, by line and column.
//!
//! ```text
//! expr       = or
//! or         = and ("or" and)*
//! and        = unary ("and" unary)*
//! unary      = "not" unary | "(" expr ")" | condition
//! condition  = PATH CMP value | PATH "in" "[" value ("," value)* "]" | PATH "exists"
//!            | "has" IDENT | "in_segment" "(" STRING ")"
//!            | "count" "(" events ")" CMP NUMBER
//!            | ("sum" | "avg") "(" events "," PATH ")" CMP NUMBER
//!            | ("first" | "last") "(" events ")" "within" DURATION
//! events     = "event" STRING ("where" filter ("and" filter)*)? ("within" DURATION)?
//! filter     = PATH CMP value
//! CMP        = "=" | "!=" | "<" | "<=" | ">" | ">=" | "contains" | "starts_with"
//! value      = STRING | NUMBER | "true" | "false"
//! DURATION   = NUMBER ("s" | "m" | "h" | "d" | "w"), such as 30d
//! ```
//!
//! Inside `events`, `and` binds to the filters: wrap an event condition in parentheses
//! to combine it with more conditions after a `where`.

use serde_json::Value;

use crate::ast::{Cmp, Events, Expr, Filter, Func, Which};

/// How deeply `not`s and parentheses may nest. Parsing recurses once per level, and the
/// tree's JSON form (stored by the collector) gains a level or two per level: the limit
/// keeps both far from any stack or parser limit.
pub const MAX_NESTING: usize = 32;

/// The longest definition taken, in bytes.
pub const MAX_DEFINITION_BYTES: usize = 64 * 1024;

/// A parse error, at a line and column (both from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    /// The line.
    pub line: usize,
    /// The column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Num(f64),
    Duration(u64),
    Cmp(Cmp),
    Open,
    Close,
    OpenBracket,
    CloseBracket,
    Comma,
    End,
}

fn describe(token: &Token) -> String {
    match token {
        Token::Word(w) => format!("{w:?}"),
        Token::Str(s) => format!("the string {s:?}"),
        Token::Num(n) => format!("the number {n}"),
        Token::Duration(_) => "a duration".to_owned(),
        Token::Cmp(_) => "a comparison".to_owned(),
        Token::Open => "\"(\"".to_owned(),
        Token::Close => "\")\"".to_owned(),
        Token::OpenBracket => "\"[\"".to_owned(),
        Token::CloseBracket => "\"]\"".to_owned(),
        Token::Comma => "\",\"".to_owned(),
        Token::End => "the end".to_owned(),
    }
}

struct Lexed {
    token: Token,
    line: usize,
    column: usize,
}

fn lex(text: &str) -> Result<Vec<Lexed>, ParseError> {
    let chars: Vec<char> = text.chars().collect();
    let (mut i, mut line, mut column) = (0, 1, 1);
    let mut out = Vec::new();
    let error = |line, column, message: String| ParseError {
        line,
        column,
        message,
    };
    while i < chars.len() {
        let c = chars[i];
        let (start_line, start_column) = (line, column);
        let advance = |n: usize, i: &mut usize, column: &mut usize| {
            *i += n;
            *column += n;
        };
        if c == '\n' {
            i += 1;
            line += 1;
            column = 1;
            continue;
        }
        if c.is_whitespace() {
            advance(1, &mut i, &mut column);
            continue;
        }
        let token = match c {
            '(' => {
                advance(1, &mut i, &mut column);
                Token::Open
            }
            ')' => {
                advance(1, &mut i, &mut column);
                Token::Close
            }
            '[' => {
                advance(1, &mut i, &mut column);
                Token::OpenBracket
            }
            ']' => {
                advance(1, &mut i, &mut column);
                Token::CloseBracket
            }
            ',' => {
                advance(1, &mut i, &mut column);
                Token::Comma
            }
            '=' => {
                advance(1, &mut i, &mut column);
                Token::Cmp(Cmp::Eq)
            }
            '!' | '<' | '>' => {
                let next_is_eq = chars.get(i + 1) == Some(&'=');
                let cmp = match (c, next_is_eq) {
                    ('!', true) => Cmp::Ne,
                    ('<', true) => Cmp::Le,
                    ('>', true) => Cmp::Ge,
                    ('<', false) => Cmp::Lt,
                    ('>', false) => Cmp::Gt,
                    _ => {
                        return Err(error(
                            line,
                            column,
                            "\"!\" must be followed by \"=\"".to_owned(),
                        ));
                    }
                };
                advance(if next_is_eq { 2 } else { 1 }, &mut i, &mut column);
                Token::Cmp(cmp)
            }
            '"' => {
                let mut value = String::new();
                advance(1, &mut i, &mut column);
                loop {
                    match chars.get(i) {
                        None | Some('\n') => {
                            return Err(error(
                                start_line,
                                start_column,
                                "this string is not closed".to_owned(),
                            ));
                        }
                        Some('"') => {
                            advance(1, &mut i, &mut column);
                            break;
                        }
                        Some('\\') if chars.get(i + 1).is_some_and(|n| *n == '"' || *n == '\\') => {
                            value.push(chars[i + 1]);
                            advance(2, &mut i, &mut column);
                        }
                        Some(other) => {
                            value.push(*other);
                            advance(1, &mut i, &mut column);
                        }
                    }
                }
                Token::Str(value)
            }
            c if c.is_ascii_digit()
                || (c == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                let begin = i;
                advance(1, &mut i, &mut column);
                while chars
                    .get(i)
                    .is_some_and(|c| c.is_ascii_digit() || *c == '.')
                {
                    advance(1, &mut i, &mut column);
                }
                let number: String = chars[begin..i].iter().collect();
                let value: f64 = number.parse().map_err(|_| {
                    error(
                        start_line,
                        start_column,
                        format!("{number:?} is not a number"),
                    )
                })?;
                let unit = chars.get(i).copied().filter(char::is_ascii_alphabetic);
                match unit {
                    Some(unit) => {
                        let seconds = match unit {
                            's' => 1.0,
                            'm' => 60.0,
                            'h' => 3_600.0,
                            'd' => 86_400.0,
                            'w' => 604_800.0,
                            other => {
                                return Err(error(
                                    line,
                                    column,
                                    format!(
                                        "{other:?} is not a duration unit: use s, m, h, d or w"
                                    ),
                                ));
                            }
                        };
                        advance(1, &mut i, &mut column);
                        if value < 0.0 {
                            return Err(error(
                                start_line,
                                start_column,
                                "a duration cannot be negative".to_owned(),
                            ));
                        }
                        Token::Duration((value * seconds) as u64)
                    }
                    None => Token::Num(value),
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                let begin = i;
                while chars
                    .get(i)
                    .is_some_and(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
                {
                    advance(1, &mut i, &mut column);
                }
                Token::Word(chars[begin..i].iter().collect())
            }
            other => return Err(error(line, column, format!("unexpected {other:?}"))),
        };
        out.push(Lexed {
            token,
            line: start_line,
            column: start_column,
        });
    }
    out.push(Lexed {
        token: Token::End,
        line,
        column,
    });
    Ok(out)
}

struct Parser {
    tokens: Vec<Lexed>,
    at: usize,
    /// `not`s and parentheses open around the current token.
    nesting: usize,
}

/// Parses a segment condition.
///
/// # Errors
///
/// A [`ParseError`] at the line and column of the first problem.
pub fn parse(text: &str) -> Result<Expr, ParseError> {
    if text.len() > MAX_DEFINITION_BYTES {
        return Err(ParseError {
            line: 1,
            column: 1,
            message: format!("a definition may be at most {MAX_DEFINITION_BYTES} bytes"),
        });
    }
    let mut parser = Parser {
        tokens: lex(text)?,
        at: 0,
        nesting: 0,
    };
    let expr = parser.or()?;
    match parser.peek() {
        Token::End => Ok(expr),
        other => Err(parser.error(format!(
            "expected \"and\", \"or\" or the end, found {}",
            describe(other)
        ))),
    }
}

impl Parser {
    fn peek(&self) -> &Token {
        &self.tokens[self.at].token
    }

    fn next(&mut self) -> Token {
        let token = self.tokens[self.at].token.clone();
        if self.at < self.tokens.len() - 1 {
            self.at += 1;
        }
        token
    }

    fn error(&self, message: String) -> ParseError {
        let here = &self.tokens[self.at];
        ParseError {
            line: here.line,
            column: here.column,
            message,
        }
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(self.peek(), Token::Word(w) if w == word)
    }

    fn expect_word(&mut self, word: &str) -> Result<(), ParseError> {
        if self.is_word(word) {
            self.next();
            Ok(())
        } else {
            Err(self.error(format!(
                "expected {word:?}, found {}",
                describe(self.peek())
            )))
        }
    }

    fn expect(&mut self, token: &Token) -> Result<(), ParseError> {
        if self.peek() == token {
            self.next();
            Ok(())
        } else {
            Err(self.error(format!(
                "expected {}, found {}",
                describe(token),
                describe(self.peek())
            )))
        }
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut any = vec![self.and()?];
        while self.is_word("or") {
            self.next();
            any.push(self.and()?);
        }
        Ok(if any.len() == 1 {
            any.remove(0)
        } else {
            Expr::Or { any }
        })
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut all = vec![self.unary()?];
        while self.is_word("and") {
            self.next();
            all.push(self.unary()?);
        }
        Ok(if all.len() == 1 {
            all.remove(0)
        } else {
            Expr::And { all }
        })
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        let nests = self.is_word("not") || self.peek() == &Token::Open;
        if !nests {
            return self.condition();
        }
        if self.nesting == MAX_NESTING {
            return Err(self.error(format!(
                "\"not\" and parentheses nest more than {MAX_NESTING} levels deep here"
            )));
        }
        self.nesting += 1;
        let expr = if self.is_word("not") {
            self.next();
            self.unary().map(|expr| Expr::Not {
                expr: Box::new(expr),
            })
        } else {
            self.next();
            self.or()
                .and_then(|expr| self.expect(&Token::Close).map(|()| expr))
        };
        self.nesting -= 1;
        expr
    }

    fn string(&mut self, what: &str) -> Result<String, ParseError> {
        match self.peek().clone() {
            Token::Str(s) => {
                self.next();
                Ok(s)
            }
            other => Err(self.error(format!(
                "expected {what} in quotes, found {}",
                describe(&other)
            ))),
        }
    }

    fn path(&mut self, what: &str) -> Result<String, ParseError> {
        match self.peek().clone() {
            Token::Word(w) if w.contains('.') && !w.starts_with('.') && !w.ends_with('.') => {
                self.next();
                Ok(w)
            }
            other => Err(self.error(format!(
                "expected {what} such as traits.plan, found {}",
                describe(&other)
            ))),
        }
    }

    fn cmp(&mut self) -> Result<Cmp, ParseError> {
        let cmp = match self.peek() {
            Token::Cmp(cmp) => *cmp,
            Token::Word(w) if w == "contains" => Cmp::Contains,
            Token::Word(w) if w == "starts_with" => Cmp::StartsWith,
            other => {
                return Err(self.error(format!(
                    "expected a comparison (=, !=, <, <=, >, >=, contains, starts_with), found {}",
                    describe(other)
                )));
            }
        };
        self.next();
        Ok(cmp)
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        let value = match self.peek() {
            Token::Str(s) => Value::String(s.clone()),
            Token::Num(n) => serde_json::Number::from_f64(*n).map_or(Value::Null, |n| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                    .map_or(Value::Number(n), |f| Value::from(f as i64))
            }),
            Token::Word(w) if w == "true" => Value::Bool(true),
            Token::Word(w) if w == "false" => Value::Bool(false),
            other => {
                return Err(self.error(format!(
                    "expected a value (a string, a number, true or false), found {}",
                    describe(other)
                )));
            }
        };
        self.next();
        Ok(value)
    }

    fn number(&mut self) -> Result<f64, ParseError> {
        match self.peek() {
            Token::Num(n) => {
                let n = *n;
                self.next();
                Ok(n)
            }
            other => Err(self.error(format!("expected a number, found {}", describe(other)))),
        }
    }

    fn duration(&mut self) -> Result<u64, ParseError> {
        match self.peek() {
            Token::Duration(secs) => {
                let secs = *secs;
                self.next();
                Ok(secs)
            }
            other => Err(self.error(format!(
                "expected a duration such as 30d, found {}",
                describe(other)
            ))),
        }
    }

    fn events(&mut self) -> Result<Events, ParseError> {
        self.expect_word("event")?;
        let name = self.string("the event name")?;
        let mut filters = Vec::new();
        if self.is_word("where") {
            self.next();
            loop {
                let path = self.path("an event field")?;
                let cmp = self.cmp()?;
                let value = self.value()?;
                filters.push(Filter { path, cmp, value });
                if !self.is_word("and") {
                    break;
                }
                self.next();
            }
        }
        let within_secs = if self.is_word("within") {
            self.next();
            Some(self.duration()?)
        } else {
            None
        };
        Ok(Events {
            name,
            filters,
            within_secs,
        })
    }

    fn condition(&mut self) -> Result<Expr, ParseError> {
        let Token::Word(word) = self.peek().clone() else {
            return Err(self.error(format!(
                "expected a condition, found {}",
                describe(self.peek())
            )));
        };
        match word.as_str() {
            "has" => {
                self.next();
                match self.peek().clone() {
                    Token::Word(identifier) if !identifier.contains('.') => {
                        self.next();
                        Ok(Expr::Has { identifier })
                    }
                    other => Err(self.error(format!(
                        "expected an identifier type after \"has\", found {}",
                        describe(&other)
                    ))),
                }
            }
            "in_segment" => {
                self.next();
                self.expect(&Token::Open)?;
                let segment = self.string("the segment key")?;
                self.expect(&Token::Close)?;
                Ok(Expr::InSegment { segment })
            }
            "count" | "sum" | "avg" => {
                self.next();
                let func = match word.as_str() {
                    "count" => Func::Count,
                    "sum" => Func::Sum,
                    _ => Func::Avg,
                };
                self.expect(&Token::Open)?;
                let events = self.events()?;
                let property = if func == Func::Count {
                    None
                } else {
                    self.expect(&Token::Comma)?;
                    Some(self.path("the numeric property")?)
                };
                self.expect(&Token::Close)?;
                let cmp = self.cmp()?;
                if matches!(cmp, Cmp::Contains | Cmp::StartsWith) {
                    return Err(self.error(format!(
                        "{word} compares with a number: use =, !=, <, <=, > or >="
                    )));
                }
                let value = self.number()?;
                Ok(Expr::Aggregate {
                    func,
                    events,
                    property,
                    cmp,
                    value,
                })
            }
            "first" | "last" => {
                self.next();
                let which = if word == "first" {
                    Which::First
                } else {
                    Which::Last
                };
                self.expect(&Token::Open)?;
                let events = self.events()?;
                self.expect(&Token::Close)?;
                self.expect_word("within")?;
                let within_secs = self.duration()?;
                Ok(Expr::Occurred {
                    which,
                    events,
                    within_secs,
                })
            }
            _ => {
                let path = self.path("a trait")?;
                if self.is_word("exists") {
                    self.next();
                    return Ok(Expr::Exists { path });
                }
                if self.is_word("in") {
                    self.next();
                    self.expect(&Token::OpenBracket)?;
                    let mut values = vec![self.value()?];
                    while self.peek() == &Token::Comma {
                        self.next();
                        values.push(self.value()?);
                    }
                    self.expect(&Token::CloseBracket)?;
                    return Ok(Expr::In { path, values });
                }
                let cmp = self.cmp()?;
                let value = self.value()?;
                Ok(Expr::Compare { path, cmp, value })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_example_of_the_issue_parses() {
        let expr = parse(
            r#"traits.plan = "pro" and count(event "Order Completed" within 30d) >= 2 and not in_segment("churned")"#,
        )
        .expect("parses");
        assert_eq!(
            serde_json::to_value(&expr).expect("json"),
            json!({"kind": "and", "all": [
                {"kind": "compare", "path": "traits.plan", "cmp": "eq", "value": "pro"},
                {"kind": "aggregate", "func": "count", "events": {"name": "Order Completed", "within_secs": 2_592_000},
                 "cmp": "ge", "value": 2.0},
                {"kind": "not", "expr": {"kind": "in_segment", "segment": "churned"}}
            ]})
        );
        let back: Expr = serde_json::from_value(serde_json::to_value(&expr).expect("json"))
            .expect("tree from JSON");
        assert_eq!(back, expr, "the JSON form is the same tree");
    }

    #[test]
    fn every_form_parses() {
        let cases = [
            r#"traits.age >= 18"#,
            r#"traits.age < 65.5"#,
            r#"traits.name != "x""#,
            r#"traits.email contains "@example.com""#,
            r#"traits.name starts_with "An""#,
            r#"traits.country in ["FR", "DE", 3]"#,
            r#"traits.email exists"#,
            r#"has email"#,
            r#"has push_token"#,
            r#"sum(event "Order Completed" within 90d, properties.total) > 100"#,
            r#"avg(event "Order Completed" where properties.currency = "EUR", properties.total) <= 20"#,
            r#"count(event "Viewed" where properties.price > 10 and properties.category = "games") = 0"#,
            r#"first(event "Signed Up") within 7d"#,
            r#"last(event "Signed In") within 2w"#,
            r#"(traits.a = 1 or traits.b = 2) and not (traits.c = true or traits.d = false)"#,
            "traits.a = 1\n  and\n  traits.b = -2",
        ];
        for case in cases {
            parse(case).unwrap_or_else(|e| panic!("{case}: {e}"));
        }
        assert_eq!(
            parse("traits.a = 1 or traits.b = 2 and traits.c = 3").expect("parses"),
            parse("traits.a = 1 or (traits.b = 2 and traits.c = 3)").expect("parses"),
            "and binds tighter than or"
        );
        assert!(matches!(parse("not not has email"), Ok(Expr::Not { .. })));
    }

    #[test]
    fn the_deepest_nesting_allowed_parses_and_its_json_reads_back() {
        let text = format!(
            "{}has email{}",
            "not (".repeat(MAX_NESTING / 2),
            ")".repeat(MAX_NESTING / 2)
        );
        let tree = parse(&text).expect("at the limit");
        let json = serde_json::to_string(&tree).expect("json");
        let back: Expr = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back, tree);
    }

    #[test]
    fn errors_point_at_line_and_column() {
        let cases = [
            ("traits.plan = ", 1, 15, "expected a value"),
            ("traits.plan == \"pro\"", 1, 14, "expected a value"),
            ("plan = \"pro\"", 1, 1, "expected a trait"),
            ("traits.plan = \"pro", 1, 15, "not closed"),
            ("traits.a = 1 and\n  traits.b ~ 2", 2, 12, "unexpected '~'"),
            (
                "traits.a = 1 traits.b = 2",
                1,
                14,
                "expected \"and\", \"or\" or the end",
            ),
            ("count(event \"E\") >= many", 1, 21, "expected a number"),
            (
                "count(event \"E\" within 30y) > 1",
                1,
                26,
                "not a duration unit",
            ),
            ("count(event E) > 1", 1, 13, "event name in quotes"),
            (
                "count(event \"E\") contains 1",
                1,
                27,
                "compares with a number",
            ),
            ("last(event \"E\")", 1, 16, "expected \"within\""),
            ("(traits.a = 1", 1, 14, "expected \")\""),
            ("in_segment(churned)", 1, 12, "segment key in quotes"),
            ("traits.a in [1, 2", 1, 18, "expected \"]\""),
            ("has", 1, 4, "identifier type"),
            (
                "sum(event \"E\", properties.x within 3d) > 1",
                1,
                29,
                "expected \")\"",
            ),
            ("traits.a ! 1", 1, 10, "must be followed"),
            ("", 1, 1, "expected a condition"),
            (
                &format!("{}has email", "not ".repeat(MAX_NESTING + 1)),
                1,
                MAX_NESTING * 4 + 1,
                "nest more than",
            ),
            (
                &format!("{}has email", "(".repeat(10_000)),
                1,
                MAX_NESTING + 1,
                "nest more than",
            ),
            (&"x".repeat(MAX_DEFINITION_BYTES + 1), 1, 1, "at most"),
        ];
        for (text, line, column, says) in cases {
            let error = parse(text).expect_err(text);
            assert_eq!(
                (error.line, error.column),
                (line, column),
                "{text}: {error}"
            );
            assert!(error.message.contains(says), "{text}: {error}");
        }
    }
}
