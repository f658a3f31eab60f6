//! What `GET /` shows of the module: its exported functions and their signatures, read from the
//! module's type, import, function and export sections (wasmparser's section readers). The
//! module is only read here, never compiled: it runs in the isolate alone, which has already
//! accepted it before this reads it.

use serde::Serialize;
use wasmparser::{ExternalKind, FuncType, Parser, Payload, TypeRef};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportedFunction {
    pub name: String,
    pub params: Vec<String>,
    pub results: Vec<String>,
}

/// The module's exported functions, in the order of its export section.
pub fn exported_functions(module: &[u8]) -> Result<Vec<ExportedFunction>, String> {
    let mut types: Vec<FuncType> = Vec::new();
    // Function index -> type index: imported functions first, then the module's own.
    let mut function_types: Vec<u32> = Vec::new();
    let mut exports: Vec<(String, u32)> = Vec::new();
    let bad = |e: wasmparser::BinaryReaderError| format!("cannot read the module: {e}");
    for payload in Parser::new(0).parse_all(module) {
        match payload.map_err(bad)? {
            Payload::TypeSection(reader) => {
                for ty in reader.into_iter_err_on_gc_types() {
                    types.push(ty.map_err(bad)?);
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader {
                    if let TypeRef::Func(ty) = import.map_err(bad)?.ty {
                        function_types.push(ty);
                    }
                }
            }
            Payload::FunctionSection(reader) => {
                for ty in reader {
                    function_types.push(ty.map_err(bad)?);
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(bad)?;
                    if export.kind == ExternalKind::Func {
                        exports.push((export.name.to_string(), export.index));
                    }
                }
            }
            _ => {}
        }
    }
    exports
        .into_iter()
        .map(|(name, index)| {
            let ty = function_types
                .get(index as usize)
                .and_then(|t| types.get(*t as usize))
                .ok_or_else(|| {
                    format!("export {name:?} names function {index}, which has no type")
                })?;
            Ok(ExportedFunction {
                name,
                params: ty.params().iter().map(ToString::to_string).collect(),
                results: ty.results().iter().map(ToString::to_string).collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_are_listed_with_their_signatures_past_imported_functions() {
        let module = wat::parse_str(
            r#"(module
                (import "agentvm" "log" (func $log (param i32 i32)))
                (memory (export "memory") 1)
                (func (export "add") (param i32 i64) (result i64)
                    local.get 0 i64.extend_i32_s local.get 1 i64.add)
                (func (export "nothing")))"#,
        )
        .unwrap();
        let exports = exported_functions(&module).unwrap();
        assert_eq!(
            exports,
            vec![
                ExportedFunction {
                    name: "add".into(),
                    params: vec!["i32".into(), "i64".into()],
                    results: vec!["i64".into()],
                },
                ExportedFunction {
                    name: "nothing".into(),
                    params: vec![],
                    results: vec![],
                },
            ]
        );
        assert!(exported_functions(b"\0asm\x01\0\0\0\x07\x05").is_err());
    }
}
