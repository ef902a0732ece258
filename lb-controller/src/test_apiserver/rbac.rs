//! RBAC as the API server applies it: a request is allowed when one rule
//! of the caller's roles matches its group, resource, verb, namespace and name.

/// One RBAC rule (from a ClusterRole, or a Role in `namespace`).
#[derive(Clone, Debug, Default)]
pub struct Rule {
    /// API groups (`""` = core).
    pub groups: Vec<String>,
    /// Resources, `name/subresource` for subresources.
    pub resources: Vec<String>,
    /// Verbs.
    pub verbs: Vec<String>,
    /// `resourceNames`; empty = any.
    pub names: Vec<String>,
    /// `Some` for a Role's rules.
    pub namespace: Option<String>,
}

impl Rule {
    pub(super) fn allows(
        &self,
        group: &str,
        resource: &str,
        verb: &str,
        ns: &str,
        name: Option<&str>,
    ) -> bool {
        let any = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        any(&self.groups, group)
            && any(&self.resources, resource)
            && any(&self.verbs, verb)
            && (self.names.is_empty() || name.is_some_and(|n| self.names.iter().any(|x| x == n)))
            && self.namespace.as_ref().is_none_or(|n| n == ns)
    }
}
