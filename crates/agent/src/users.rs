//! Users and groups: parses `/etc/passwd` and `/etc/group` by hand (the agent is a static
//! binary, so NSS is not available) and resolves Dockerfile `USER` syntax (`name`, `uid`,
//! `name:group`, `uid:gid`, `name:gid`, `uid:group`) to a uid, a gid, supplementary groups and
//! a home directory.
//!
//! Choices, as Docker makes them: a numeric uid that `/etc/passwd` does not list is allowed,
//! with gid 0 (unless a group is given), home `/` and no supplementary groups; a name that is
//! not listed is an error. Supplementary groups are the groups of `/etc/group` that list the
//! user's name as a member, plus the primary gid.

use std::path::Path;

/// Why a `user` could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsersError {
    #[error("unknown user {0:?}: it is not in /etc/passwd")]
    UnknownUser(String),
    #[error("unknown group {0:?}: it is not in /etc/group")]
    UnknownGroup(String),
    #[error("malformed user {0:?}: expected name, uid, name:group or uid:gid")]
    Malformed(String),
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, the primary gid included.
    pub groups: Vec<u32>,
    pub home: String,
}

/// Parses `/etc/passwd` text; malformed lines are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 6 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// Parses `/etc/group` text; malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            let members = f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members,
            })
        })
        .collect()
}

fn numeric(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Resolves Docker `USER` syntax against the parsed databases; `None` or empty is root.
pub fn resolve(
    spec: Option<&str>,
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
) -> Result<User, UsersError> {
    let spec = spec.map(str::trim).unwrap_or("");
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (if spec.is_empty() { "0" } else { spec }, None),
    };
    if user_part.is_empty() || group_part.is_some_and(str::is_empty) {
        return Err(UsersError::Malformed(spec.to_string()));
    }
    let entry = match numeric(user_part) {
        Some(uid) => passwd.iter().find(|e| e.uid == uid),
        None => Some(
            passwd
                .iter()
                .find(|e| e.name == user_part)
                .ok_or_else(|| UsersError::UnknownUser(user_part.to_string()))?,
        ),
    };
    let uid = match (entry, numeric(user_part)) {
        (_, Some(uid)) => uid,
        (Some(e), None) => e.uid,
        (None, None) => return Err(UsersError::UnknownUser(user_part.to_string())),
    };
    let gid = match group_part {
        Some(g) => match numeric(g) {
            Some(gid) => gid,
            None => {
                groups
                    .iter()
                    .find(|e| e.name == g)
                    .ok_or_else(|| UsersError::UnknownGroup(g.to_string()))?
                    .gid
            }
        },
        None => entry.map_or(0, |e| e.gid),
    };
    let mut supplementary = vec![gid];
    if let Some(e) = entry {
        for g in groups {
            if g.members.contains(&e.name) && !supplementary.contains(&g.gid) {
                supplementary.push(g.gid);
            }
        }
    }
    let home = entry
        .map(|e| e.home.clone())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".to_string());
    Ok(User {
        uid,
        gid,
        groups: supplementary,
        home,
    })
}

/// Resolves `spec` against `/etc/passwd` and `/etc/group` under `root` (missing files count
/// as empty).
pub fn resolve_in(root: &Path, spec: Option<&str>) -> Result<User, UsersError> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    resolve(spec, &parse_passwd(&passwd), &parse_group(&group))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # comment\n\
                          app:x:1000:1000:App:/home/app:/bin/sh\n\
                          broken:line\n\
                          nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:app,other\napp:x:1000:\nstaff:x:50:\n";

    fn db() -> (Vec<PasswdEntry>, Vec<GroupEntry>) {
        (parse_passwd(PASSWD), parse_group(GROUP))
    }

    #[test]
    fn test_parse_passwd_malformed_lines_are_skipped() {
        let entries = parse_passwd(PASSWD);

        assert_eq!(entries.len(), 3);
    }

    #[test]
    fn test_parse_group_members_are_split() {
        let groups = parse_group(GROUP);

        assert_eq!(groups[1].members, vec!["app", "other"]);
    }

    #[test]
    fn test_resolve_none_is_root() {
        let (p, g) = db();

        let user = resolve(None, &p, &g).unwrap();

        assert_eq!((user.uid, user.gid, user.home.as_str()), (0, 0, "/root"));
    }

    #[test]
    fn test_resolve_name_uses_passwd_and_groups() {
        let (p, g) = db();

        let user = resolve(Some("app"), &p, &g).unwrap();

        assert_eq!(
            user,
            User {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 10],
                home: "/home/app".into()
            }
        );
    }

    #[test]
    fn test_resolve_name_and_group_name_uses_group() {
        let (p, g) = db();

        let user = resolve(Some("app:staff"), &p, &g).unwrap();

        assert_eq!((user.uid, user.gid), (1000, 50));
    }

    #[test]
    fn test_resolve_name_and_numeric_gid_uses_gid() {
        let (p, g) = db();

        let user = resolve(Some("app:77"), &p, &g).unwrap();

        assert_eq!((user.uid, user.gid), (1000, 77));
    }

    #[test]
    fn test_resolve_known_uid_uses_passwd_entry() {
        let (p, g) = db();

        let user = resolve(Some("1000"), &p, &g).unwrap();

        assert_eq!((user.gid, user.home.as_str()), (1000, "/home/app"));
    }

    #[test]
    fn test_resolve_unknown_uid_gets_gid_zero_and_root_home() {
        let (p, g) = db();

        let user = resolve(Some("4242"), &p, &g).unwrap();

        assert_eq!(
            user,
            User {
                uid: 4242,
                gid: 0,
                groups: vec![0],
                home: "/".into()
            }
        );
    }

    #[test]
    fn test_resolve_uid_gid_uses_both() {
        let (p, g) = db();

        let user = resolve(Some("4242:4343"), &p, &g).unwrap();

        assert_eq!((user.uid, user.gid), (4242, 4343));
    }

    #[test]
    fn test_resolve_unknown_name_is_error() {
        let (p, g) = db();

        let result = resolve(Some("ghost"), &p, &g);

        assert_eq!(result, Err(UsersError::UnknownUser("ghost".into())));
    }

    #[test]
    fn test_resolve_unknown_group_is_error() {
        let (p, g) = db();

        let result = resolve(Some("app:ghosts"), &p, &g);

        assert_eq!(result, Err(UsersError::UnknownGroup("ghosts".into())));
    }

    #[test]
    fn test_resolve_empty_group_is_malformed() {
        let (p, g) = db();

        let result = resolve(Some("app:"), &p, &g);

        assert_eq!(result, Err(UsersError::Malformed("app:".into())));
    }
}
