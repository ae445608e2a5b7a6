//! Storage growth: Kubernetes quantities compared, and what an edit of `spec.storage` asks of
//! the members' volumes. A StatefulSet's claim template cannot change, so the controller keeps
//! the one it has, grows each member's claim in place (where the StorageClass allows
//! expansion), and once every claim took the new size re-creates the StatefulSet with it (pods
//! orphaned, then adopted again) for members added later; shrinking and another StorageClass
//! are refused (volumes cannot shrink or move).
//! Pure: the controller reads claims and the StatefulSet, this decides.

use k8s_openapi::api::core::v1::PersistentVolumeClaimSpec;

use crate::crd::StorageSpec;

/// A Kubernetes quantity (`resource.Quantity`: `10Gi`, `500M`, `1.5Ti`, `1e9`, `100m`) in
/// bytes, or `None` when it is not one.
pub fn bytes(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let n: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    let b = n * scale;
    b.is_finite().then_some(b)
}

/// The requested size of a claim (spec).
pub fn requested(spec: &PersistentVolumeClaimSpec) -> Option<String> {
    spec.resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .map(|q| q.0.clone())
}

/// What `spec.storage` asks of volumes that exist with `current` (the claim template).
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// As the claim template says.
    Same,
    /// Bigger volumes: every member's claim grows in place.
    Grow { from: String, to: String },
    /// Smaller volumes: refused (a volume cannot shrink).
    Shrink { from: String, to: String },
    /// Another StorageClass: refused (a volume cannot move).
    OtherClass {
        from: Option<String>,
        to: Option<String>,
    },
}

pub fn change(current: &PersistentVolumeClaimSpec, wanted: &StorageSpec) -> Change {
    if wanted.storage_class_name.is_some()
        && wanted.storage_class_name != current.storage_class_name
    {
        return Change::OtherClass {
            from: current.storage_class_name.clone(),
            to: wanted.storage_class_name.clone(),
        };
    }
    let Some(from) = requested(current) else {
        return Change::Same;
    };
    match (bytes(&from), bytes(&wanted.size)) {
        (Some(a), Some(b)) if b > a => Change::Grow {
            from,
            to: wanted.size.clone(),
        },
        (Some(a), Some(b)) if b < a => Change::Shrink {
            from,
            to: wanted.size.clone(),
        },
        _ => Change::Same,
    }
}

/// Whether a claim asking for `requested` must grow to `to`.
pub fn must_grow(requested: Option<&str>, to: &str) -> bool {
    match (requested.and_then(bytes), bytes(to)) {
        (Some(a), Some(b)) => b > a,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::VolumeResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn claim(size: &str, class: Option<&str>) -> PersistentVolumeClaimSpec {
        PersistentVolumeClaimSpec {
            storage_class_name: class.map(str::to_string),
            resources: Some(VolumeResourceRequirements {
                requests: Some([("storage".to_string(), Quantity(size.to_string()))].into()),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }
    }

    fn wanted(size: &str, class: Option<&str>) -> StorageSpec {
        StorageSpec {
            size: size.to_string(),
            storage_class_name: class.map(str::to_string),
        }
    }

    #[test]
    fn quantities_in_bytes() {
        assert_eq!(bytes("8Gi"), Some(8.0 * 1024f64.powi(3)));
        assert_eq!(bytes("500M"), Some(5e8));
        assert_eq!(bytes("1.5Ki"), Some(1536.0));
        assert_eq!(bytes("1e3"), Some(1000.0));
        assert_eq!(bytes("100m"), Some(0.1));
        assert_eq!(bytes("10"), Some(10.0));
        for bad in ["", "Gi", "ten", "1GB", "1 Gi", "1e999"] {
            assert_eq!(bytes(bad), None, "{bad}");
        }
        assert!(bytes("1Gi").unwrap() > bytes("1000M").unwrap());
        assert!(bytes("1G").unwrap() < bytes("1Gi").unwrap());
    }

    #[test]
    fn grow_shrink_and_class_changes() {
        assert_eq!(
            change(&claim("8Gi", None), &wanted("8Gi", None)),
            Change::Same
        );
        // The same size written otherwise is no change.
        assert_eq!(
            change(&claim("1Gi", None), &wanted("1024Mi", None)),
            Change::Same
        );
        assert_eq!(
            change(&claim("8Gi", None), &wanted("16Gi", None)),
            Change::Grow {
                from: "8Gi".into(),
                to: "16Gi".into()
            }
        );
        assert_eq!(
            change(&claim("8Gi", None), &wanted("4Gi", None)),
            Change::Shrink {
                from: "8Gi".into(),
                to: "4Gi".into()
            }
        );
        assert_eq!(
            change(&claim("8Gi", Some("fast")), &wanted("8Gi", Some("slow"))),
            Change::OtherClass {
                from: Some("fast".into()),
                to: Some("slow".into())
            }
        );
        // No class named: the volumes keep theirs.
        assert_eq!(
            change(&claim("8Gi", Some("fast")), &wanted("8Gi", None)),
            Change::Same
        );
        assert!(must_grow(Some("8Gi"), "16Gi"));
        assert!(!must_grow(Some("16Gi"), "16Gi"));
        assert!(!must_grow(None, "16Gi"));
    }
}
