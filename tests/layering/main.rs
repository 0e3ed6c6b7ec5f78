//! The layering check: no circle between the modules of any crate of the workspace, and no
//! dependency between its crates that `docs/architecture.md` does not list.
//!
//! Each compile unit (a crate's library, each binary, test and example target) is read with
//! `syn` from its root file down its `mod` declarations. A module depends on another when it
//! names it or an item in it: `use` trees and every path in its code (`crate::`, `super::`,
//! `self::`, a child module's name), a `pub use` re-export followed to where the item lives.
//! Inline modules (`mod tests { … }`) count as part of their file. The crate edges come from every
//! `Cargo.toml` (`[dependencies]`, `[dev-dependencies]`, `[build-dependencies]`) and must match the
//! `crate-edges` block of `docs/architecture.md`, both ways.
//!
//! `cargo test -p tests --test layering -- --nocapture` prints each unit's module graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One module: its path inside the unit (`[]` for the root) and the file that holds it.
#[derive(Debug)]
struct Module {
    file: PathBuf,
    /// Named modules this one depends on (full paths inside the unit).
    uses: BTreeSet<Vec<String>>,
    /// `pub use` re-exports: name -> the full path it stands for.
    reexports: BTreeMap<String, Vec<String>>,
    /// Child modules declared here (file or inline).
    children: BTreeSet<String>,
    /// Raw references, resolved once every module is known: (path as written, from which module).
    raw: Vec<Vec<String>>,
}

/// Collects the references and declarations of one file; inline modules fold into it.
struct Collector {
    /// The module path of the file.
    base: Vec<String>,
    /// Nesting inside the file's inline modules.
    inline: Vec<String>,
    refs: Vec<Vec<String>>,
    reexports: BTreeMap<String, Vec<String>>,
    file_mods: Vec<String>,
    inline_mods: Vec<String>,
}

impl Collector {
    fn here(&self) -> Vec<String> {
        let mut m = self.base.clone();
        m.extend(self.inline.iter().cloned());
        m
    }

    /// Makes `segs` (as written in the current module) absolute within the unit, if it is a
    /// unit-internal path (`crate`, `super`, `self`, or relative to the current module).
    fn absolute(&self, segs: &[String]) -> Option<Vec<String>> {
        let first = segs.first()?;
        let mut cur = self.here();
        let rest: &[String] = match first.as_str() {
            "crate" => {
                cur.clear();
                &segs[1..]
            }
            "self" => &segs[1..],
            "super" => {
                let mut i = 0;
                while segs.get(i).is_some_and(|s| s == "super") {
                    cur.pop()?;
                    i += 1;
                }
                &segs[i..]
            }
            _ => {
                // relative: resolved later against the module's children and imports
                let mut p = vec!["<rel>".to_string()];
                p.extend(cur);
                p.push("<end>".to_string());
                p.extend(segs.iter().cloned());
                return Some(p);
            }
        };
        cur.extend(rest.iter().cloned());
        Some(cur)
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, t: &syn::UseTree, public: bool) {
        match t {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree, public);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix.clone();
                let name = n.ident.to_string();
                if name != "self" {
                    full.push(name.clone());
                }
                self.record_use(full, public.then_some(name));
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix.clone();
                full.push(r.ident.to_string());
                self.record_use(full, public.then(|| r.rename.to_string()));
            }
            syn::UseTree::Glob(_) => self.record_use(prefix.clone(), None),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t, public);
                }
            }
        }
    }

    fn record_use(&mut self, full: Vec<String>, reexport_as: Option<String>) {
        if let Some(abs) = self.absolute(&full) {
            if let Some(name) = reexport_as {
                if self.inline.is_empty() {
                    self.reexports.insert(name, abs.clone());
                }
            }
            self.refs.push(abs);
        }
    }
}

impl<'ast> Visit<'ast> for Collector {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let public = matches!(u.vis, syn::Visibility::Public(_));
        self.use_tree(&mut Vec::new(), &u.tree, public);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        let name = m.ident.to_string();
        match &m.content {
            None => {
                if self.inline.is_empty() {
                    self.file_mods.push(name);
                }
            }
            Some((_, items)) => {
                if self.inline.is_empty() {
                    self.inline_mods.push(name.clone());
                }
                self.inline.push(name);
                for i in items {
                    self.visit_item(i);
                }
                self.inline.pop();
            }
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if segs.len() > 1 {
            if let Some(abs) = self.absolute(&segs) {
                self.refs.push(abs);
            }
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        // paths inside macro calls (format!, assert!, vec!, …) as far as they parse as
        // expressions separated by commas
        let parser = syn::punctuated::Punctuated::<syn::Expr, syn::Token![,]>::parse_terminated;
        if let Ok(args) = syn::parse::Parser::parse2(parser, m.tokens.clone()) {
            for e in &args {
                self.visit_expr(e);
            }
        }
        syn::visit::visit_macro(self, m);
    }
}

/// Where the file of child module `name` of a module in `file` lives.
fn child_file(file: &Path, is_dir_owner: bool, name: &str) -> Option<PathBuf> {
    let dir = if is_dir_owner {
        file.parent()?.to_path_buf()
    } else {
        file.with_extension("")
    };
    [
        dir.join(format!("{name}.rs")),
        dir.join(name).join("mod.rs"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// One compile unit: its modules by path.
struct Unit {
    name: String,
    modules: BTreeMap<Vec<String>, Module>,
}

fn read_unit(name: String, root_file: &Path) -> Unit {
    let mut modules = BTreeMap::new();
    let mut todo = vec![(Vec::<String>::new(), root_file.to_path_buf(), true)];
    while let Some((path, file, dir_owner)) = todo.pop() {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let ast =
            syn::parse_file(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", file.display()));
        let mut c = Collector {
            base: path.clone(),
            inline: Vec::new(),
            refs: Vec::new(),
            reexports: BTreeMap::new(),
            file_mods: Vec::new(),
            inline_mods: Vec::new(),
        };
        c.visit_file(&ast);
        // `pub use child::Item;` (a path relative to this module) re-exports from a child
        let kids: BTreeSet<&String> = c.file_mods.iter().chain(&c.inline_mods).collect();
        for target in c.reexports.values_mut() {
            if target.first().map(String::as_str) == Some("<rel>") {
                let end = target.iter().position(|s| s == "<end>").unwrap();
                if target.get(end + 1).is_some_and(|f| kids.contains(f)) {
                    let mut t = path.clone();
                    t.extend(target[end + 1..].iter().cloned());
                    *target = t;
                }
            }
        }
        for child in &c.file_mods {
            let f = child_file(&file, dir_owner, child)
                .unwrap_or_else(|| panic!("{}: no file for `mod {child}`", file.display()));
            let owner = f.file_name().is_some_and(|n| n == "mod.rs");
            let mut p = path.clone();
            p.push(child.clone());
            todo.push((p, f, owner));
        }
        let children = c.file_mods.iter().chain(&c.inline_mods).cloned().collect();
        modules.insert(
            path,
            Module {
                file,
                uses: BTreeSet::new(),
                reexports: c.reexports,
                children,
                raw: c.refs,
            },
        );
    }
    let mut unit = Unit { name, modules };
    resolve(&mut unit);
    unit
}

/// The file module a full path names (longest known prefix), following `pub use` re-exports.
fn module_of(unit: &Unit, path: &[String], depth: u32) -> Vec<String> {
    let mut n = path.len();
    while n > 0 && !unit.modules.contains_key(&path[..n]) {
        n -= 1;
    }
    let m = &path[..n];
    // an item re-exported by that module: where it really lives
    if depth < 8 {
        if let Some(next) = path.get(n) {
            if let Some(target) = unit.modules[m].reexports.get(next) {
                if target.first().map(String::as_str) != Some("<rel>") {
                    let mut t = target.clone();
                    t.extend(path[n + 1..].iter().cloned());
                    return module_of(unit, &t, depth + 1);
                }
            }
        }
    }
    m.to_vec()
}

fn resolve(unit: &mut Unit) {
    let keys: Vec<Vec<String>> = unit.modules.keys().cloned().collect();
    for k in keys {
        let raw = std::mem::take(&mut unit.modules.get_mut(&k).unwrap().raw);
        let mut uses = BTreeSet::new();
        for r in raw {
            let abs = if r.first().map(String::as_str) == Some("<rel>") {
                // `<rel> CUR… <end> SEGS…`: a path relative to the current (possibly inline)
                // module; only a child module's name makes it unit-internal
                let end = r.iter().position(|s| s == "<end>").unwrap();
                let cur = &r[1..end];
                let segs = &r[end + 1..];
                let mut p = cur.to_vec();
                p.extend(segs.iter().cloned());
                let owner = module_of(unit, cur, 0);
                let first = &segs[0];
                let is_child = unit
                    .modules
                    .get(&owner)
                    .is_some_and(|m| m.children.contains(first));
                if !is_child || cur.len() != owner.len() {
                    continue;
                }
                p
            } else {
                r
            };
            let target = module_of(unit, &abs, 0);
            if target != k {
                uses.insert(target);
            }
        }
        unit.modules.get_mut(&k).unwrap().uses = uses;
    }
}

fn mod_name(p: &[String]) -> String {
    if p.is_empty() {
        "(root)".into()
    } else {
        p.join("::")
    }
}

/// Strongly connected components with more than one module (Tarjan).
fn circles(unit: &Unit) -> Vec<Vec<String>> {
    let ids: Vec<&Vec<String>> = unit.modules.keys().collect();
    let idx: BTreeMap<&Vec<String>, usize> = ids.iter().enumerate().map(|(i, k)| (*k, i)).collect();
    let adj: Vec<Vec<usize>> = ids
        .iter()
        .map(|k| {
            unit.modules[*k]
                .uses
                .iter()
                .filter_map(|u| idx.get(u).copied())
                .collect()
        })
        .collect();
    struct T {
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn strong(v: usize, adj: &[Vec<usize>], t: &mut T) {
        t.index[v] = Some(t.next);
        t.low[v] = t.next;
        t.next += 1;
        t.stack.push(v);
        t.on[v] = true;
        for &w in &adj[v] {
            match t.index[w] {
                None => {
                    strong(w, adj, t);
                    t.low[v] = t.low[v].min(t.low[w]);
                }
                Some(iw) if t.on[w] => t.low[v] = t.low[v].min(iw),
                _ => {}
            }
        }
        if Some(t.low[v]) == t.index[v] {
            let mut c = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on[w] = false;
                c.push(w);
                if w == v {
                    break;
                }
            }
            if c.len() > 1 {
                t.out.push(c);
            }
        }
    }
    let n = ids.len();
    let mut t = T {
        index: vec![None; n],
        low: vec![0; n],
        on: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            strong(v, &adj, &mut t);
        }
    }
    let mut out: Vec<Vec<String>> = t
        .out
        .into_iter()
        .map(|c| {
            let mut names: Vec<String> = c.into_iter().map(|i| mod_name(ids[i])).collect();
            names.sort();
            names
        })
        .collect();
    out.sort();
    out
}

/// The workspace's crates: (name, directory, manifest).
fn crates() -> Vec<(String, PathBuf, toml::Table)> {
    let r = root();
    let ws: toml::Table = std::fs::read_to_string(r.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let ws = ws["workspace"].as_table().unwrap();
    let mut dirs: Vec<String> = ws["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    for e in ws
        .get("exclude")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        dirs.push(e.as_str().unwrap().to_string());
    }
    dirs.into_iter()
        .map(|d| {
            let dir = r.join(&d);
            let m: toml::Table = std::fs::read_to_string(dir.join("Cargo.toml"))
                .unwrap()
                .parse()
                .unwrap_or_else(|e| panic!("{d}/Cargo.toml: {e}"));
            let name = m["package"]["name"].as_str().unwrap().to_string();
            (name, dir, m)
        })
        .collect()
}

/// Every compile unit of a crate: (label, root file).
fn units_of(name: &str, dir: &Path, m: &toml::Table) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let lib = m
        .get("lib")
        .and_then(|l| l.get("path"))
        .and_then(|p| p.as_str())
        .map(|p| dir.join(p))
        .unwrap_or_else(|| dir.join("src/lib.rs"));
    if lib.exists() {
        out.push((format!("{name} (lib)"), lib));
    }
    let mut seen = BTreeSet::new();
    for kind in ["bin", "test", "example"] {
        for t in m.get(kind).and_then(|v| v.as_array()).into_iter().flatten() {
            if let Some(p) = t.get("path").and_then(|p| p.as_str()) {
                let n = t.get("name").and_then(|n| n.as_str()).unwrap_or(p);
                seen.insert(dir.join(p));
                out.push((format!("{name} ({kind} {n})"), dir.join(p)));
            }
        }
    }
    let main = dir.join("src/main.rs");
    if main.exists() && !seen.contains(&main) {
        out.push((format!("{name} (bin)"), main));
    }
    for sub in ["src/bin", "tests", "examples"] {
        let Ok(rd) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "rs"))
            .filter(|p| !seen.contains(p))
            .collect();
        files.sort();
        for f in files {
            let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
            out.push((format!("{name} ({sub}/{stem})"), f));
        }
    }
    out
}

#[test]
fn no_module_circles_in_any_crate() {
    let mut found = BTreeSet::new();
    for (name, dir, m) in crates() {
        for (label, file) in units_of(&name, &dir, &m) {
            let unit = read_unit(label, &file);
            println!("{} ({} modules)", unit.name, unit.modules.len());
            for (p, md) in &unit.modules {
                let uses: Vec<String> = md.uses.iter().map(|u| mod_name(u)).collect();
                println!(
                    "  {} [{}] -> {}",
                    mod_name(p),
                    md.file.strip_prefix(root()).unwrap_or(&md.file).display(),
                    uses.join(", ")
                );
            }
            for c in circles(&unit) {
                found.insert(format!("{}: {}", unit.name, c.join(", ")));
            }
        }
    }
    for c in &found {
        println!("circle: {c}");
    }
    assert!(
        found.is_empty(),
        "module circles (a module depends on another that depends back on it, maybe through others):\n  {}\nsee docs/architecture.md",
        found.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  ")
    );
}

/// One line each, or `(none)`.
fn list(v: &[&String]) -> String {
    if v.is_empty() {
        "(none)".to_string()
    } else {
        v.iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  ")
    }
}

/// The crate edges of the workspace: `a -> b` (normal), `a -> b (dev)`, `a -> b (build)`.
fn crate_edges() -> BTreeSet<String> {
    let all = crates();
    let names: BTreeSet<String> = all.iter().map(|c| c.0.clone()).collect();
    let mut edges = BTreeSet::new();
    for (name, _, m) in &all {
        for (section, tag) in [
            ("dependencies", ""),
            ("dev-dependencies", " (dev)"),
            ("build-dependencies", " (build)"),
        ] {
            for dep in m
                .get(section)
                .and_then(|d| d.as_table())
                .into_iter()
                .flatten()
            {
                let dname = dep
                    .1
                    .get("package")
                    .and_then(|p| p.as_str())
                    .unwrap_or(dep.0);
                if names.contains(dname) {
                    edges.insert(format!("{name} -> {dname}{tag}"));
                }
            }
        }
    }
    edges
}

#[test]
fn crate_edges_are_the_documented_ones() {
    let doc_path = root().join("docs/architecture.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/architecture.md");
    let block = doc
        .split("```crate-edges")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("docs/architecture.md has no ```crate-edges block");
    let documented: BTreeSet<String> = block
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let actual = crate_edges();
    for e in &actual {
        println!("{e}");
    }
    let undocumented: Vec<&String> = actual.difference(&documented).collect();
    let stale: Vec<&String> = documented.difference(&actual).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "crate edges not in docs/architecture.md:\n  {}\nlisted there but not in any Cargo.toml:\n  {}",
        list(&undocumented),
        list(&stale)
    );
}

/// The check itself: a circle through a `pub use` re-export and a `super::` path is found; a
/// child that only uses its parent is not one.
#[test]
fn the_check_finds_circles_through_reexports_and_super_paths() {
    let dir = std::env::temp_dir().join(format!("layering-selftest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("b")).unwrap();
    let write = |f: &str, s: &str| std::fs::write(dir.join(f), s).unwrap();
    // lib: a, b (with b::c); a -> (root re-export of b::c::X) -> b::c; b::c -> super::super::a
    write("lib.rs", "mod a;\nmod b;\npub use b::c::X;\n");
    write("a.rs", "pub fn f() -> crate::X { crate::X }\n");
    write("b/mod.rs", "pub mod c;\n");
    write(
        "b/c.rs",
        "pub struct X;\npub fn g() { super::super::a::f(); }\n",
    );
    let unit = read_unit("selftest (lib)".into(), &dir.join("lib.rs"));
    let found = circles(&unit);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(found, vec![vec!["a".to_string(), "b::c".to_string()]]);
    let a = &unit.modules[&vec!["a".to_string()]];
    assert!(a.uses.contains(&vec!["b".to_string(), "c".to_string()]));
}
