//! Versioned services on a shared prefix: which instances of a service are routed
//! (`serviceTag`) and how a destination rewrites the path before it reaches them (`stripPath`,
//! `reqPathSearchReplace`, and Docker Flow Proxy's older `reqPathSearch`/`reqPathReplace` pair).
//!
//! - `serviceTag=rest,v1` (per service): only instances carrying every listed Consul tag are
//!   routed; the registry is asked with `?tag=rest&tag=v1`, and so does the instance follower.
//! - `stripPath.N=true` (per destination; the unsuffixed value is every destination's default):
//!   the matched `servicePath` prefix is removed, `/hello/v1/x?q=1` → `/x?q=1`, `/hello/v1` → `/`.
//!   Only for `path_beg` and `path` destinations: with the other path types there is no prefix.
//! - `reqPathSearchReplace.N=search,replace:search2,replace2` (per destination, as in Docker Flow
//!   Proxy): each regex `search` is replaced, at its first match in the path, by `replace`, in
//!   order (after `stripPath`). `reqPathSearch.N` with `reqPathReplace.N` is one such pair.
//!
//! A search becomes the regex of an `http-request replace-path` rule, wrapped as
//! `^(.*?)(<search>)(.*)$` so that, as with Docker Flow Proxy's `regsub`, only the match is
//! replaced and the rest of the path kept. Both words are written single-quoted, where HAProxy's
//! parser takes every character literally up to the next quote; so the values may hold no quote,
//! no whitespace and no `#`, and everything else is checked here: the search is a regex of a
//! restricted syntax (balanced groups, known escapes, no `(?`/`(*` constructs or backreferences,
//! at most [`MAX_SEARCH_GROUPS`] groups, so the wrapper's groups keep their numbers), and the
//! replacement is path text starting with `/` with `\0`–`\N` backreferences (its `%` are
//! doubled for HAProxy's log-format), so every rewritten path still starts with `/`. A regex HAProxy's engine still refuses (`[z-a]`) is refused by `haproxy -c`.

use std::collections::BTreeMap;

use super::values::{
    is_path_char, parse_flag, parse_list, shown, spec_error, PathType, ReqMode, ServicePath,
};
use super::SpecError;

/// Most tags in `serviceTag`.
pub const MAX_SERVICE_TAGS: usize = 8;
/// Most characters of one Consul tag.
const MAX_TAG_LEN: usize = 128;
/// Most search/replace pairs per destination.
pub const MAX_SEARCH_REPLACE_PAIRS: usize = 16;
/// Most characters of one search or one replacement.
const MAX_REWRITE_LEN: usize = 256;
/// Most capture groups in one search: the wrapper adds two before them and one after, and
/// HAProxy's replacement knows `\0` to `\9` only.
pub const MAX_SEARCH_GROUPS: usize = 6;

/// One Consul tag an instance must carry to be routed (`serviceTag`).
///
/// Letters, digits and `- _ . : / @`: it travels in a query string (`?tag=`) and never reaches
/// haproxy.cfg.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceTag(String);

impl ServiceTag {
    /// Validates one tag given as `parameter`.
    pub fn parse(parameter: &str, value: &str) -> Result<ServiceTag, SpecError> {
        if value.is_empty() {
            return Err(spec_error(parameter, "a tag must not be empty"));
        }
        if value.chars().count() > MAX_TAG_LEN {
            return Err(spec_error(
                parameter,
                format!(
                    "{} is too long: at most {MAX_TAG_LEN} characters",
                    shown(value)
                ),
            ));
        }
        let allowed =
            |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@');
        if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
            return Err(spec_error(
                parameter,
                format!(
                    "{} contains {}; a tag may hold letters, digits and - _ . : / @",
                    shown(value),
                    shown(&bad.to_string())
                ),
            ));
        }
        Ok(ServiceTag(value.to_string()))
    }

    /// The tag as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ServiceTag {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// Parses `serviceTag`: a comma list of tags, every one of which an instance must carry.
pub(crate) fn parse_service_tags(
    parameter: &str,
    items: &[&str],
) -> Result<Vec<ServiceTag>, SpecError> {
    parse_list(parameter, items, MAX_SERVICE_TAGS, "tags", |item| {
        ServiceTag::parse(parameter, item)
    })
}

/// How one destination rewrites the path before the request reaches an instance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PathRewrite {
    /// `stripPath`: remove the matched `servicePath` prefix.
    strip_path: bool,
    /// `reqPathSearchReplace` (or `reqPathSearch`/`reqPathReplace`), applied in order.
    search_replace: Vec<SearchReplace>,
}

impl PathRewrite {
    /// Reads this group's parameters of one destination; `name` gives the name the user wrote
    /// for a base name (`stripPath` → `stripPath.2`).
    pub(crate) fn parse(
        params: &BTreeMap<&'static str, &str>,
        name: impl Fn(&str) -> String,
    ) -> Result<PathRewrite, SpecError> {
        let strip_path = params
            .get("stripPath")
            .map(|v| parse_flag(&name("stripPath"), v))
            .transpose()?
            .unwrap_or(false);
        let mut search_replace = Vec::new();
        match (params.get("reqPathSearch"), params.get("reqPathReplace")) {
            (Some(search), Some(replace)) => {
                if params.contains_key("reqPathSearchReplace") {
                    return Err(spec_error(
                        &name("reqPathSearch"),
                        format!(
                            "give either {} or {} with {}, not both",
                            name("reqPathSearchReplace"),
                            name("reqPathSearch"),
                            name("reqPathReplace")
                        ),
                    ));
                }
                search_replace.push(SearchReplace::from_parts(
                    &name("reqPathSearch"),
                    &name("reqPathReplace"),
                    search,
                    replace,
                )?);
            }
            (Some(_), None) => {
                return Err(spec_error(
                    &name("reqPathSearch"),
                    format!("needs {} as well", name("reqPathReplace")),
                ))
            }
            (None, Some(_)) => {
                return Err(spec_error(
                    &name("reqPathReplace"),
                    format!("needs {} as well", name("reqPathSearch")),
                ))
            }
            (None, None) => {}
        }
        if let Some(value) = params.get("reqPathSearchReplace") {
            search_replace = parse_pairs(&name("reqPathSearchReplace"), value)?;
        }
        Ok(PathRewrite {
            strip_path,
            search_replace,
        })
    }

    /// Reads the stored form back with the query's rules.
    pub(crate) fn from_stored(
        index: u16,
        strip_path: bool,
        pairs: &[String],
    ) -> Result<PathRewrite, SpecError> {
        let parameter = super::query::indexed("reqPathSearchReplace", index);
        if pairs.len() > MAX_SEARCH_REPLACE_PAIRS {
            return Err(too_many_pairs(&parameter, pairs.len()));
        }
        let search_replace = pairs
            .iter()
            .map(|pair| SearchReplace::parse(&parameter, pair))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PathRewrite {
            strip_path,
            search_replace,
        })
    }

    /// Whether the matched `servicePath` prefix is removed.
    pub fn strip_path(&self) -> bool {
        self.strip_path
    }

    /// The search/replace pairs, in the order they run.
    pub fn search_replace(&self) -> &[SearchReplace] {
        &self.search_replace
    }

    /// Whether the destination rewrites nothing.
    pub fn is_empty(&self) -> bool {
        !self.strip_path && self.search_replace.is_empty()
    }

    /// The pairs as stored (`search,replace` each).
    pub(crate) fn stored_pairs(&self) -> Vec<String> {
        self.search_replace
            .iter()
            .map(SearchReplace::as_pair)
            .collect()
    }

    /// The rules between this group and the rest of destination `index`.
    pub(crate) fn check(
        &self,
        index: u16,
        req_mode: ReqMode,
        path_type: PathType,
        paths: &[ServicePath],
    ) -> Result<(), SpecError> {
        let name = |base: &str| super::query::indexed(base, index);
        if req_mode == ReqMode::Tcp {
            if self.strip_path {
                return Err(spec_error(
                    &name("stripPath"),
                    "not allowed with reqMode=tcp (a path rewrite; TCP is forwarded as is)",
                ));
            }
            if !self.search_replace.is_empty() {
                return Err(spec_error(
                    &name("reqPathSearchReplace"),
                    "not allowed with reqMode=tcp (a path rewrite; TCP is forwarded as is)",
                ));
            }
        }
        if self.strip_path {
            if paths.is_empty() {
                return Err(spec_error(
                    &name("stripPath"),
                    format!(
                        "needs {}: the prefix removed is the servicePath the request matched",
                        name("servicePath")
                    ),
                ));
            }
            if !matches!(path_type, PathType::PathBeg | PathType::Path) {
                return Err(spec_error(
                    &name("stripPath"),
                    format!(
                        "works with pathType path_beg or path only: a {path_type} pattern is not \
                         a prefix of the path; use reqPathSearchReplace instead"
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn too_many_pairs(parameter: &str, given: usize) -> SpecError {
    spec_error(
        parameter,
        format!("{given} pairs given: at most {MAX_SEARCH_REPLACE_PAIRS} per destination"),
    )
}

/// Parses `search,replace:search2,replace2`.
fn parse_pairs(parameter: &str, value: &str) -> Result<Vec<SearchReplace>, SpecError> {
    let pairs: Vec<&str> = value.split(':').collect();
    if pairs.len() > MAX_SEARCH_REPLACE_PAIRS {
        return Err(too_many_pairs(parameter, pairs.len()));
    }
    pairs
        .into_iter()
        .map(|pair| SearchReplace::parse(parameter, pair))
        .collect()
}

/// One regex search and its replacement, applied to the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchReplace {
    search: String,
    replace: String,
    /// Capture groups in `search`.
    groups: usize,
}

impl SearchReplace {
    /// Parses one `search,replace` pair given as `parameter`.
    pub fn parse(parameter: &str, pair: &str) -> Result<SearchReplace, SpecError> {
        let Some((search, replace)) = pair.split_once(',') else {
            return Err(spec_error(
                parameter,
                format!(
                    "{} is not a pair: write search,replace (pairs separated by `:`)",
                    shown(pair)
                ),
            ));
        };
        if replace.contains(',') {
            return Err(spec_error(
                parameter,
                format!(
                    "{} has more than one `,`: write search,replace (pairs separated by `:`)",
                    shown(pair)
                ),
            ));
        }
        SearchReplace::from_parts(parameter, parameter, search, replace)
    }

    /// Validates a search (given as `search_parameter`) and its replacement.
    fn from_parts(
        search_parameter: &str,
        replace_parameter: &str,
        search: &str,
        replace: &str,
    ) -> Result<SearchReplace, SpecError> {
        let groups = check_search(search_parameter, search)?;
        check_replace(replace_parameter, replace, groups)?;
        Ok(SearchReplace {
            search: search.to_string(),
            replace: replace.to_string(),
            groups,
        })
    }

    /// The search, as given.
    pub fn search(&self) -> &str {
        &self.search
    }

    /// The replacement, as given.
    pub fn replace(&self) -> &str {
        &self.replace
    }

    /// `search,replace`, the stored form.
    pub fn as_pair(&self) -> String {
        format!("{},{}", self.search, self.replace)
    }

    /// The `replace-path` regex: the whole path, with the search's first match in group 2.
    pub fn haproxy_regex(&self) -> String {
        format!("^(.*?)({})(.*)$", self.search)
    }

    /// The `replace-path` format: the text before the match, the replacement (its
    /// backreferences moved past the wrapper's two groups, `%` doubled for log-format), then
    /// the text after the match.
    pub fn haproxy_format(&self) -> String {
        let mut format = String::from("\\1");
        let mut chars = self.replace.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    // Checked: a digit from 0 to the search's group count follows.
                    let group = chars.next().and_then(|d| d.to_digit(10)).unwrap_or(0);
                    format.push('\\');
                    format.push_str(&(group + 2).to_string());
                }
                '%' => format.push_str("%%"),
                c => format.push(c),
            }
        }
        format.push('\\');
        format.push_str(&(self.groups + 3).to_string());
        format
    }
}

/// Characters a search may hold outside escapes: path characters and regex operators; no
/// quote, whitespace, `#`, `,` or `:` (the separators of the pairs), `<` or `>`.
fn is_search_char(c: char) -> bool {
    c != ':'
        && (is_path_char(c) || matches!(c, '^' | '$' | '[' | ']' | '{' | '}' | '|' | '?' | '\\'))
}

/// Characters a backslash may escape in a search.
fn is_search_escape(c: char) -> bool {
    matches!(c, 'd' | 'D' | 'w' | 'W' | 's' | 'S' | 'b' | 'B')
        || (is_search_char(c) && !c.is_ascii_alphanumeric())
}

/// Checks a search regex; returns how many capture groups it has.
fn check_search(parameter: &str, search: &str) -> Result<usize, SpecError> {
    let error = |message: String| Err(spec_error(parameter, message));
    if search.is_empty() {
        return error("the search must not be empty".into());
    }
    if search.chars().count() > MAX_REWRITE_LEN {
        return error(format!(
            "{} is too long: at most {MAX_REWRITE_LEN} characters",
            shown(search)
        ));
    }
    if let Some(bad) = search.chars().find(|c| !is_search_char(*c)) {
        return error(format!(
            "{} contains {}, not allowed in a search (no quote, whitespace, `#`, `,`, `:`, `<` or `>`)",
            shown(search),
            shown(&bad.to_string())
        ));
    }
    if search.starts_with(['*', '+', '?', '{']) {
        return error(format!(
            "{} starts with a repetition, with nothing to repeat",
            shown(search)
        ));
    }
    let chars: Vec<char> = search.chars().collect();
    let mut groups = 0;
    let mut depth = 0usize;
    let mut position = 0;
    while position < chars.len() {
        match chars[position] {
            '\\' => {
                position += 1;
                check_escape(parameter, search, chars.get(position).copied())?;
            }
            '[' => {
                // A class: `]` right after `[` or `[^` is literal; escapes as outside.
                position += 1;
                if chars.get(position) == Some(&'^') {
                    position += 1;
                }
                if chars.get(position) == Some(&']') {
                    position += 1;
                }
                loop {
                    match chars.get(position) {
                        None => return error(format!("{} has a `[` never closed", shown(search))),
                        Some(']') => break,
                        Some('\\') => {
                            position += 1;
                            check_escape(parameter, search, chars.get(position).copied())?;
                        }
                        Some(_) => {}
                    }
                    position += 1;
                }
            }
            '(' => {
                if matches!(chars.get(position + 1), Some('?' | '*')) {
                    return error(format!(
                        "{}: `(?` and `(*` constructs are not supported, only plain groups",
                        shown(search)
                    ));
                }
                depth += 1;
                groups += 1;
            }
            ')' => {
                if depth == 0 {
                    return error(format!("{} has a `)` without its `(`", shown(search)));
                }
                depth -= 1;
            }
            _ => {}
        }
        position += 1;
    }
    if depth > 0 {
        return error(format!("{} has a `(` never closed", shown(search)));
    }
    if groups > MAX_SEARCH_GROUPS {
        return error(format!(
            "{} has {groups} groups: at most {MAX_SEARCH_GROUPS}",
            shown(search)
        ));
    }
    Ok(groups)
}

fn check_escape(parameter: &str, search: &str, escaped: Option<char>) -> Result<(), SpecError> {
    match escaped {
        None => Err(spec_error(
            parameter,
            format!("{} ends with a lone backslash", shown(search)),
        )),
        Some(c) if is_search_escape(c) => Ok(()),
        Some(c) => Err(spec_error(
            parameter,
            format!(
                "{} has the escape \\{c}: only \\d \\D \\w \\W \\s \\S \\b \\B and escaped \
                 punctuation are supported (no backreferences in a search)",
                shown(search)
            ),
        )),
    }
}

/// Checks a replacement: path characters (`:` and `%` included) and backreferences `\0`–`\N`
/// to the search's `groups`, starting with `/`. A path starts with `/`, so text before the match
/// does too; the replacement must as well, or a match at the start would leave a path without
/// its `/` (an empty one, which the instance cannot read, or one that runs into the host of an
/// absolute URI, as HTTP/2 requests carry).
fn check_replace(parameter: &str, replace: &str, groups: usize) -> Result<(), SpecError> {
    if !replace.starts_with('/') {
        return Err(spec_error(
            parameter,
            format!(
                "the replacement {} must start with `/`, so the rewritten path stays a path \
                 (to remove a segment, put the `/` before it in both: `/v1/,/`)",
                shown(replace)
            ),
        ));
    }
    if replace.chars().count() > MAX_REWRITE_LEN {
        return Err(spec_error(
            parameter,
            format!(
                "{} is too long: at most {MAX_REWRITE_LEN} characters",
                shown(replace)
            ),
        ));
    }
    let mut chars = replace.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next().and_then(|d| d.to_digit(10)) {
                Some(group) if group as usize <= groups => {}
                Some(group) => {
                    return Err(spec_error(
                        parameter,
                        format!(
                            "{} refers to group \\{group}, but the search has {groups} groups",
                            shown(replace)
                        ),
                    ))
                }
                None => {
                    return Err(spec_error(
                        parameter,
                        format!(
                            "{}: a backslash in a replacement must be followed by a group number (\\0 to \\{groups})",
                            shown(replace)
                        ),
                    ))
                }
            }
        } else if !is_path_char(c) {
            return Err(spec_error(
                parameter,
                format!(
                    "{} contains {}, not allowed in a replacement (path characters and \\N only)",
                    shown(replace),
                    shown(&c.to_string())
                ),
            ));
        }
    }
    Ok(())
}

/// The `replace-path` rule that removes a destination's matched `servicePath` prefix: one regex
/// over every path (longest first, so the most specific prefix is taken) and the format `/\2`.
pub fn strip_prefix_rule(paths: &[ServicePath]) -> (String, String) {
    let mut sorted: Vec<&str> = paths.iter().map(ServicePath::as_str).collect();
    sorted.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    let alternatives: Vec<String> = sorted.iter().map(|path| regex_literal(path)).collect();
    (
        format!("^({})/?(.*)$", alternatives.join("|")),
        "/\\2".to_string(),
    )
}

/// A literal path as regex text: its regex operators escaped.
fn regex_literal(path: &str) -> String {
    let mut literal = String::with_capacity(path.len());
    for c in path.chars() {
        if matches!(
            c,
            '.' | '(' | ')' | '*' | '+' | '?' | '[' | ']' | '{' | '}' | '|' | '^' | '$' | '\\'
        ) {
            literal.push('\\');
        }
        literal.push(c);
    }
    literal
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::{accepted, parse};
    use crate::spec::ServiceSpec;

    /// The error for `pairs`, which must name `parameter`.
    fn refused(pairs: &[(&str, &str)], parameter: &str) -> String {
        match parse(pairs) {
            Ok(spec) => panic!("{pairs:?} was accepted as {spec:?}"),
            Err(error) => {
                assert_eq!(error.parameter, parameter, "{error}");
                error.message
            }
        }
    }

    fn pair(search: &str, replace: &str) -> SearchReplace {
        SearchReplace::parse("reqPathSearchReplace", &format!("{search},{replace}"))
            .unwrap_or_else(|error| panic!("{search},{replace} refused: {error}"))
    }

    #[test]
    fn service_tags_are_a_list_kept_as_given_in_the_stored_form() {
        let spec = accepted(&[
            ("serviceName", "hello"),
            ("servicePath", "/hello/v1"),
            ("serviceTag", "v1,rest"),
        ]);
        let tags: Vec<&str> = spec.service_tag().iter().map(ServiceTag::as_str).collect();
        assert_eq!(tags, ["v1", "rest"]);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["ServiceTag"], serde_json::json!(["v1", "rest"]));
        let back: ServiceSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn bad_service_tags_are_refused_naming_the_parameter() {
        let base = [("serviceName", "hello"), ("servicePath", "/hello")];
        for bad in [
            "",
            "a b",
            "rest&tag=x",
            "a#b",
            "rest,",
            "x,x",
            "é",
            "a%20b",
            "a+b",
        ] {
            let mut pairs = base.to_vec();
            pairs.push(("serviceTag", bad));
            refused(&pairs, "serviceTag");
        }
        let mut pairs = base.to_vec();
        pairs.push(("serviceTag.1", "rest"));
        refused(&pairs, "serviceTag.1");
        let nine = "a,b,c,d,e,f,g,h,i";
        let mut pairs = base.to_vec();
        pairs.push(("serviceTag", nine));
        assert!(refused(&pairs, "serviceTag").contains("at most 8"));
    }

    #[test]
    fn strip_path_is_a_destination_flag_with_an_unsuffixed_default() {
        let spec = accepted(&[
            ("serviceName", "hello"),
            ("stripPath", "true"),
            ("servicePath.1", "/hello/v1"),
            ("servicePath.2", "/hello/v2"),
            ("stripPath.2", "false"),
        ]);
        let strips: Vec<bool> = spec
            .destinations()
            .iter()
            .map(|d| d.path_rewrite().strip_path())
            .collect();
        assert_eq!(strips, [true, false]);
    }

    #[test]
    fn strip_path_needs_a_prefix_path() {
        let message = refused(
            &[
                ("serviceName", "hello"),
                ("servicePath", "/hello/v[0-9]"),
                ("pathType", "path_reg"),
                ("stripPath", "true"),
            ],
            "stripPath",
        );
        assert!(message.contains("path_beg or path"), "{message}");
        refused(
            &[
                ("serviceName", "hello"),
                ("serviceDomain", "example.com"),
                ("stripPath", "true"),
            ],
            "stripPath",
        );
        refused(
            &[
                ("serviceName", "db"),
                ("reqMode", "tcp"),
                ("srcPort", "5432"),
                ("stripPath", "true"),
            ],
            "stripPath",
        );
        refused(
            &[
                ("serviceName", "hello"),
                ("servicePath", "/hello"),
                ("stripPath", "yes"),
            ],
            "stripPath",
        );
        accepted(&[
            ("serviceName", "hello"),
            ("servicePath", "/hello"),
            ("pathType", "path"),
            ("stripPath", "true"),
        ]);
    }

    #[test]
    fn search_replace_pairs_are_read_in_order_and_stored_as_given() {
        let spec = accepted(&[
            ("serviceName", "hello"),
            ("servicePath", "/hello"),
            ("reqPathSearchReplace", "/hello/,/:/v([0-9]+),/version-\\1"),
        ]);
        let [destination] = spec.destinations() else {
            panic!("one destination: {spec:?}")
        };
        let pairs: Vec<(&str, &str)> = destination
            .path_rewrite()
            .search_replace()
            .iter()
            .map(|p| (p.search(), p.replace()))
            .collect();
        assert_eq!(pairs, [("/hello/", "/"), ("/v([0-9]+)", "/version-\\1")]);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json["ServiceDest"][0]["ReqPathSearchReplace"],
            serde_json::json!(["/hello/,/", "/v([0-9]+),/version-\\1"])
        );
        let back: ServiceSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn the_older_search_and_replace_pair_is_one_pair() {
        let spec = accepted(&[
            ("serviceName", "kibana"),
            ("servicePath", "/kibana"),
            ("reqPathSearch", "/kibana/"),
            ("reqPathReplace", "/"),
        ]);
        let rewrite = spec.destinations()[0].path_rewrite();
        assert_eq!(rewrite.search_replace(), [pair("/kibana/", "/")]);
        let base = [("serviceName", "kibana"), ("servicePath", "/kibana")];
        let mut pairs = base.to_vec();
        pairs.push(("reqPathSearch", "/kibana/"));
        assert!(refused(&pairs, "reqPathSearch").contains("reqPathReplace"));
        let mut pairs = base.to_vec();
        pairs.push(("reqPathReplace", "/"));
        refused(&pairs, "reqPathReplace");
        let mut pairs = base.to_vec();
        pairs.extend([
            ("reqPathSearch", "/kibana/"),
            ("reqPathReplace", "/"),
            ("reqPathSearchReplace", "/a,/b"),
        ]);
        refused(&pairs, "reqPathSearch");
    }

    #[test]
    fn indexed_search_replace_belongs_to_its_destination_only() {
        let spec = accepted(&[
            ("serviceName", "hello"),
            ("servicePath.1", "/a"),
            ("servicePath.2", "/b"),
            ("reqPathSearchReplace.2", "/b,/c"),
        ]);
        let counts: Vec<usize> = spec
            .destinations()
            .iter()
            .map(|d| d.path_rewrite().search_replace().len())
            .collect();
        assert_eq!(counts, [0, 1]);
    }

    #[test]
    fn searches_that_could_escape_their_word_or_change_the_wrapper_are_refused() {
        let bad_searches = [
            "",                      // empty
            "a b",                   // a space ends the word
            "a'b",                   // a quote ends the single-quoted word
            "a\"b",                  // quote
            "a#b",                   // a comment
            "a\nb",                  // a new line
            "a\tb",                  // tab
            "a<b",                   // named groups
            "(?i)a",                 // inline flags
            "(?=a)b",                // lookaround
            "(*UTF)a",               // verbs
            "a)(b",                  // unbalanced
            "(a",                    // never closed
            "a)",                    // no opening
            "[a",                    // class never closed
            "a\\",                   // lone backslash escapes the wrapper's `(`
            "(a)\\1",                // a backreference would point into the wrapper
            "\\Qa",                  // quoting would swallow the wrapper
            "\\x41",                 // unknown escapes
            "*a",                    // nothing to repeat: `(*` once wrapped
            "?a",                    // `(?` once wrapped
            "(a)(b)(c)(d)(e)(f)(g)", // more groups than `\9` reaches
            "é",                     // not ASCII
        ];
        for search in bad_searches {
            let value = format!("{search},/");
            let message = refused(
                &[
                    ("serviceName", "hello"),
                    ("servicePath", "/hello"),
                    ("reqPathSearchReplace", &value),
                ],
                "reqPathSearchReplace",
            );
            assert!(!message.is_empty());
        }
    }

    #[test]
    fn replacements_are_path_text_with_known_backreferences() {
        for bad in [
            "/a b", "/a'b", "/a#b", "/\\2", "/\\x", "/\\", "/a\"b", "/{x}", "/a$b", "/[x]", "/<",
            "", "x", "\\1", "%2F",
        ] {
            let value = format!("(x),{bad}");
            refused(
                &[
                    ("serviceName", "hello"),
                    ("servicePath", "/hello"),
                    ("reqPathSearchReplace", &value),
                ],
                "reqPathSearchReplace",
            );
        }
        for bad in ["/a", "/a,/b,/c", "/a,/b:", ":/a,/b"] {
            refused(
                &[
                    ("serviceName", "hello"),
                    ("servicePath", "/hello"),
                    ("reqPathSearchReplace", bad),
                ],
                "reqPathSearchReplace",
            );
        }
        let too_many = vec!["/a,/b"; MAX_SEARCH_REPLACE_PAIRS + 1].join(":");
        refused(
            &[
                ("serviceName", "hello"),
                ("servicePath", "/hello"),
                ("reqPathSearchReplace", &too_many),
            ],
            "reqPathSearchReplace",
        );
        // A segment is removed with the slash before it in both.
        accepted(&[
            ("serviceName", "hello"),
            ("servicePath", "/hello"),
            ("reqPathSearchReplace", "/hello/,/"),
        ]);
    }

    #[test]
    fn the_haproxy_rule_keeps_the_text_around_the_match_and_shifts_backreferences() {
        let rule = pair("/v([0-9]+)/", "/version-\\1/%41\\0");
        assert_eq!(rule.haproxy_regex(), "^(.*?)(/v([0-9]+)/)(.*)$");
        assert_eq!(rule.haproxy_format(), "\\1/version-\\3/%%41\\2\\4");
        let plain = pair("/hello/", "/");
        assert_eq!(plain.haproxy_regex(), "^(.*?)(/hello/)(.*)$");
        assert_eq!(plain.haproxy_format(), "\\1/\\3");
        let classes = pair("[()|]\\.\\d(a|b)", "/");
        assert_eq!(classes.haproxy_format(), "\\1/\\4");
    }

    #[test]
    fn the_strip_rule_takes_the_longest_path_first_and_escapes_regex_operators() {
        let paths = [
            ServicePath::parse("servicePath", "/hello", PathType::PathBeg).unwrap(),
            ServicePath::parse("servicePath", "/hello/v1.0+(x)*", PathType::PathBeg).unwrap(),
        ];
        let (regex, format) = strip_prefix_rule(&paths);
        assert_eq!(regex, "^(/hello/v1\\.0\\+\\(x\\)\\*|/hello)/?(.*)$");
        assert_eq!(format, "/\\2");
    }
}
