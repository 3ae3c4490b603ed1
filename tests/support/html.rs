//! Just enough HTML to submit the IdP's forms and read the gateway's pages.

/// A `<form>` with its `<input>` fields.
#[derive(Debug, Clone, Default)]
pub struct Form {
    pub action: String,
    pub method: String,
    pub inputs: Vec<Input>,
}

#[derive(Debug, Clone, Default)]
pub struct Input {
    pub kind: String,
    pub name: String,
    pub value: String,
}

/// Attributes of one start tag's inner text (`form a="b" c`), names lower-cased.
fn attrs(tag: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let b = tag.as_bytes();
    let mut i = 0;
    // skip the tag name
    while i < b.len() && !b[i].is_ascii_whitespace() {
        i += 1;
    }
    loop {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b'/') {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' && b[i] != b'/' {
            i += 1;
        }
        let name = tag[start..i].to_ascii_lowercase();
        let mut value = String::new();
        if i < b.len() && b[i] == b'=' {
            i += 1;
            if i < b.len() && (b[i] == b'"' || b[i] == b'\'') {
                let q = b[i];
                i += 1;
                let vs = i;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
                value = tag[vs..i].to_string();
                i += 1;
            } else {
                let vs = i;
                while i < b.len() && !b[i].is_ascii_whitespace() {
                    i += 1;
                }
                value = tag[vs..i].to_string();
            }
        }
        if !name.is_empty() {
            out.push((name, unescape(&value)));
        }
    }
    out
}

pub fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn get(a: &[(String, String)], name: &str) -> Option<String> {
    a.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// The first `<form>` of a page, with its inputs.
pub fn first_form(page: &str) -> Option<Form> {
    let lower = page.to_ascii_lowercase();
    let start = lower.find("<form")?;
    let open_end = start + lower[start..].find('>')?;
    let close = lower[open_end..]
        .find("</form")
        .map_or(page.len(), |i| open_end + i);
    let fa = attrs(&page[start + 1..open_end]);
    let mut form = Form {
        action: get(&fa, "action").unwrap_or_default(),
        method: get(&fa, "method")
            .unwrap_or_else(|| "get".into())
            .to_ascii_lowercase(),
        inputs: Vec::new(),
    };
    let mut pos = open_end;
    while let Some(i) = lower[pos..close].find("<input") {
        let s = pos + i;
        let e = s + lower[s..].find('>')?;
        let a = attrs(&page[s + 1..e]);
        form.inputs.push(Input {
            kind: get(&a, "type")
                .unwrap_or_else(|| "text".into())
                .to_ascii_lowercase(),
            name: get(&a, "name").unwrap_or_default(),
            value: get(&a, "value").unwrap_or_default(),
        });
        pos = e;
    }
    Some(form)
}

/// The fields a user submits: hidden values as given, the user name in text
/// fields, `password` in password fields.
pub fn fill(form: &Form, user: &str, password: &str) -> Vec<(String, String)> {
    form.inputs
        .iter()
        .filter(|i| !i.name.is_empty())
        .filter_map(|i| match i.kind.as_str() {
            "password" => Some((i.name.clone(), password.to_string())),
            "text" | "email" if i.value.is_empty() => Some((i.name.clone(), user.to_string())),
            "submit" | "button" | "image" | "checkbox" | "radio" => None,
            _ => Some((i.name.clone(), i.value.clone())),
        })
        .collect()
}

/// The value of the hidden input `name` of the first form.
pub fn hidden_value(page: &str, name: &str) -> Option<String> {
    first_form(page)?
        .inputs
        .into_iter()
        .find(|i| i.name == name)
        .map(|i| i.value)
}
