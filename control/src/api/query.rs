//! Boolean query parameters as kube converts them, shared by the API server (ListOptions,
//! PatchOptions, PodLogOptions) and the kubelet API (its `containerLogs` decodes PodLogOptions
//! with the same parameter codec, `legacyscheme.ParameterCodec.DecodeParameters` in
//! `pkg/kubelet/server/server.go` `getContainerLogs`). Pure code.

/// A boolean query parameter as kube converts it
/// (`k8s.io/apimachinery/pkg/runtime/conversion.go`, `Convert_Slice_string_To_bool` and
/// `Convert_Slice_string_To_Pointer_bool`, which the parameter codec uses for ListOptions,
/// PatchOptions and PodLogOptions alike): only `0` and `false` in any case are false; any other
/// value — `1`, `true`, the Python client's `True`, even `yes` or an empty value — is true.
/// An absent parameter is false (or unset, for the `*bool` ones), which callers see as `None`.
/// (This is not `strconv.ParseBool`: kube never answers 400 for a boolean parameter.)
pub fn parse_bool(value: &str) -> bool {
    !(value == "0" || value.eq_ignore_ascii_case("false"))
}

/// Rewrites a present boolean parameter to `"true"` or `"false"` by [`parse_bool`].
pub fn normalize_bool(value: &mut Option<String>) {
    if let Some(v) = value.as_mut() {
        *v = if parse_bool(v) { "true" } else { "false" }.to_string();
    }
}

/// Whether a boolean parameter normalized by [`normalize_bool`] is set.
pub fn flag(value: &Option<String>) -> bool {
    value.as_deref() == Some("true")
}
