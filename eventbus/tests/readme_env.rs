//! The README's table of environment variables is the one the backends declare
//! ([`BusConfig::env_vars`]). `EVENTBUS_BLESS=1 cargo test -p eventbus --all-features --test
//! readme_env` rewrites it.
#![cfg(all(feature = "nats", feature = "kafka", feature = "memory"))]

use eventbus::BusConfig;

const BEGIN: &str = "<!-- env-vars:begin -->";
const END: &str = "<!-- env-vars:end -->";

fn table() -> String {
    let mut t = String::from("| variable | backend | sets | values |\n|---|---|---|---|\n");
    for (kind, v) in BusConfig::env_vars() {
        let secret = if v.secret {
            " (secret: never shown)"
        } else {
            ""
        };
        t.push_str(&format!(
            "| `{}` | {kind} | {} | {}{secret} |\n",
            v.name, v.sets, v.values
        ));
    }
    t
}

#[test]
fn readme_lists_every_backend_variable() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md");
    let (b, e) = (
        readme.find(BEGIN).expect("README has the env-vars block") + BEGIN.len(),
        readme.find(END).expect("README ends the env-vars block"),
    );
    let want = format!("\n{}", table());
    if readme[b..e] == want {
        return;
    }
    if std::env::var_os("EVENTBUS_BLESS").is_some() {
        std::fs::write(path, format!("{}{want}{}", &readme[..b], &readme[e..])).expect("write");
        return;
    }
    panic!(
        "README.md's variable table differs from BusConfig::env_vars(); rerun with \
         EVENTBUS_BLESS=1 to rewrite it. Expected:\n{want}"
    );
}

/// Every `EVENTBUS_*` variable the README's configuration text names is one the config reads:
/// a backend's own, or a field's generic form.
#[test]
fn readme_names_only_variables_that_exist() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md");
    let start = readme
        .find("## Configuration")
        .expect("Configuration section");
    let end = start
        + readme[start..]
            .find("\n## Consuming")
            .expect("next section");
    let own: Vec<&str> = BusConfig::env_vars().iter().map(|(_, v)| v.name).collect();
    let text = &readme[start..end];
    let mut checked = 0;
    for (i, _) in text.match_indices("EVENTBUS_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if name.contains('<') || name.ends_with('_') || name == "EVENTBUS_" {
            continue; // a pattern (`EVENTBUS_<SECTION>_<FIELD>`) or a prefix
        }
        checked += 1;
        if own.contains(&name.as_str()) {
            continue;
        }
        // A generic form: it must name a field. A value of the wrong type still names it.
        let e = BusConfig::default().with_vars([(name.as_str(), "1")]);
        if let Err(e) = e {
            assert!(
                !e.to_string().contains("names no bus config field"),
                "the README names {name}, which the config does not read: {e}"
            );
        }
    }
    assert!(
        checked > 5,
        "the README's configuration names variables ({checked})"
    );
}
