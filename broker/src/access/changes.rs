//! Changes to access control, each made on a copy of the [`State`] with
//! the records to store listed in `ops` (see [`Access::change`]): users,
//! vhosts, permissions, topic permissions, limits, policies.

use super::*;

pub fn add_user(
    s: &mut State,
    ops: &mut Vec<RecordOp>,
    name: &str,
    password_hash: String,
    algorithm: Algorithm,
    tags: Vec<String>,
) -> Result<(), String> {
    check_name("user", name)?;
    check_tags(&tags)?;
    password::validate(algorithm, &password_hash)?;
    let u = User {
        name: name.to_owned(),
        password_hash,
        algorithm,
        tags,
        limits: Limits::default(),
    };
    ops.push(user_op(&u));
    s.users.insert(name.to_owned(), u);
    Ok(())
}

pub fn delete_user(s: &mut State, ops: &mut Vec<RecordOp>, name: &str) -> Result<(), String> {
    if s.users.remove(name).is_none() {
        return Err(format!("user '{name}' does not exist"));
    }
    ops.push(del(USER, name.to_owned()));
    drop_permissions(s, ops, |_vhost, user| user == name);
    Ok(())
}

/// Remove every permission and topic permission of the (vhost, user)
/// pairs `doomed` picks.
fn drop_permissions(s: &mut State, ops: &mut Vec<RecordOp>, doomed: impl Fn(&str, &str) -> bool) {
    s.permissions.retain(|(v, u), _| {
        let gone = doomed(v, u);
        if gone {
            ops.push(del(PERMISSION, perm_key(v, u)));
        }
        !gone
    });
    s.topic_permissions.retain(|(v, u, x), _| {
        let gone = doomed(v, u);
        if gone {
            ops.push(del(TOPIC_PERMISSION, topic_key(v, u, x)));
        }
        !gone
    });
}

/// Replace an existing user's password hash (when `hash` is given) and
/// tags.
pub fn update_user(
    s: &mut State,
    ops: &mut Vec<RecordOp>,
    name: &str,
    hash: Option<(String, Algorithm)>,
    tags: Vec<String>,
) -> Result<(), String> {
    check_tags(&tags)?;
    if let Some((h, alg)) = &hash {
        password::validate(*alg, h)?;
    }
    let u = s
        .users
        .get_mut(name)
        .ok_or_else(|| format!("user '{name}' does not exist"))?;
    if let Some((h, alg)) = hash {
        u.password_hash = h;
        u.algorithm = alg;
    }
    u.tags = tags;
    ops.push(user_op(u));
    Ok(())
}

/// Replace an existing vhost's description and tags.
pub fn update_vhost(
    s: &mut State,
    ops: &mut Vec<RecordOp>,
    name: &str,
    description: &str,
    tags: Vec<String>,
) -> Result<(), String> {
    let v = s
        .vhosts
        .get_mut(name)
        .ok_or_else(|| format!("vhost '{name}' does not exist"))?;
    v.description = description.to_owned();
    v.tags = tags;
    ops.push(vhost_op(v));
    Ok(())
}

/// Delete a vhost with everything of it access control holds: its
/// permissions, topic permissions, policies and operator policies.
pub fn delete_vhost(s: &mut State, ops: &mut Vec<RecordOp>, name: &str) -> Result<(), String> {
    if s.vhosts.remove(name).is_none() {
        return Err(format!("vhost '{name}' does not exist"));
    }
    ops.push(del(VHOST, name.to_owned()));
    drop_permissions(s, ops, |vhost, _user| vhost == name);
    for (kind, map) in [
        (POLICY, &mut s.policies),
        (OPERATOR_POLICY, &mut s.operator_policies),
    ] {
        map.retain(|(v, n), _| {
            let gone = v == name;
            if gone {
                ops.push(del(kind, perm_key(v, n)));
            }
            !gone
        });
    }
    Ok(())
}

/// Clear every topic permission of `user` in `vhost`.
pub fn clear_topic_permissions(
    s: &mut State,
    ops: &mut Vec<RecordOp>,
    user: &str,
    vhost: &str,
) -> Result<(), String> {
    let before = s.topic_permissions.len();
    s.topic_permissions.retain(|(v, u, x), _| {
        let gone = v == vhost && u == user;
        if gone {
            ops.push(del(TOPIC_PERMISSION, topic_key(v, u, x)));
        }
        !gone
    });
    if s.topic_permissions.len() == before {
        return Err(format!(
            "user '{user}' has no topic permissions in vhost '{vhost}'"
        ));
    }
    Ok(())
}

pub fn add_vhost(
    s: &mut State,
    ops: &mut Vec<RecordOp>,
    name: &str,
    description: &str,
    tags: Vec<String>,
) -> Result<(), String> {
    check_name("vhost", name)?;
    let v = VhostMeta {
        name: name.to_owned(),
        description: description.to_owned(),
        tags,
        limits: Limits::default(),
    };
    ops.push(vhost_op(&v));
    s.vhosts.insert(name.to_owned(), v);
    Ok(())
}

/// Set a user's limits (`max-connections`, `max-channels`).
pub fn set_user_limits(
    s: &mut State,
    ops: &mut Vec<RecordOp>,
    user: &str,
    limits: Limits,
) -> Result<(), String> {
    if limits.max_queues.is_some() {
        return Err("max-queues is a vhost limit, not a user limit".into());
    }
    let u = s
        .users
        .get_mut(user)
        .ok_or_else(|| format!("user '{user}' does not exist"))?;
    u.limits = limits;
    ops.push(user_op(u));
    Ok(())
}

/// Set a vhost's limits (`max-connections`, `max-queues`).
pub fn set_vhost_limits(
    s: &mut State,
    ops: &mut Vec<RecordOp>,
    vhost: &str,
    limits: Limits,
) -> Result<(), String> {
    if limits.max_channels.is_some() {
        return Err("max-channels is a user limit, not a vhost limit".into());
    }
    let v = s
        .vhosts
        .get_mut(vhost)
        .ok_or_else(|| format!("vhost '{vhost}' does not exist"))?;
    v.limits = limits;
    ops.push(vhost_op(v));
    Ok(())
}

pub fn set_permissions(
    s: &mut State,
    ops: &mut Vec<RecordOp>,
    user: &str,
    vhost: &str,
    configure: &str,
    write: &str,
    read: &str,
) -> Result<(), String> {
    if !s.users.contains_key(user) {
        return Err(format!("user '{user}' does not exist"));
    }
    if !s.vhosts.contains_key(vhost) {
        return Err(format!("vhost '{vhost}' does not exist"));
    }
    let p = Permission::new(configure, write, read)?;
    ops.push(put(
        PERMISSION,
        perm_key(vhost, user),
        &PermRec {
            configure: configure.into(),
            write: write.into(),
            read: read.into(),
        },
    ));
    s.permissions.insert((vhost.to_owned(), user.to_owned()), p);
    Ok(())
}

pub fn clear_permissions(
    s: &mut State,
    ops: &mut Vec<RecordOp>,
    user: &str,
    vhost: &str,
) -> Result<(), String> {
    if s.permissions
        .remove(&(vhost.to_owned(), user.to_owned()))
        .is_none()
    {
        return Err(format!(
            "user '{user}' has no permissions in vhost '{vhost}'"
        ));
    }
    ops.push(del(PERMISSION, perm_key(vhost, user)));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn set_topic_permissions(
    s: &mut State,
    ops: &mut Vec<RecordOp>,
    user: &str,
    vhost: &str,
    exchange: &str,
    write: &str,
    read: &str,
) -> Result<(), String> {
    if !s.users.contains_key(user) {
        return Err(format!("user '{user}' does not exist"));
    }
    if !s.vhosts.contains_key(vhost) {
        return Err(format!("vhost '{vhost}' does not exist"));
    }
    let t = TopicPermission::new(write, read)?;
    ops.push(put(
        TOPIC_PERMISSION,
        topic_key(vhost, user, exchange),
        &TopicRec {
            write: write.into(),
            read: read.into(),
        },
    ));
    s.topic_permissions
        .insert((vhost.to_owned(), user.to_owned(), exchange.to_owned()), t);
    Ok(())
}

/// Set (add or replace) a policy, or an operator policy (`operator`).
pub fn set_policy(
    s: &mut State,
    ops: &mut Vec<RecordOp>,
    policy: Policy,
    operator: bool,
) -> Result<(), String> {
    if !s.vhosts.contains_key(&policy.vhost) {
        return Err(format!("vhost '{}' does not exist", policy.vhost));
    }
    check_name("policy", &policy.name)?;
    let (kind, map) = if operator {
        (OPERATOR_POLICY, &mut s.operator_policies)
    } else {
        (POLICY, &mut s.policies)
    };
    ops.push(put(
        kind,
        perm_key(&policy.vhost, &policy.name),
        &PolicyRec {
            pattern: policy.pattern.clone(),
            apply_to: policy.apply_to.name().to_owned(),
            priority: policy.priority,
            definition: policy.raw.clone(),
        },
    ));
    map.insert(
        (policy.vhost.clone(), policy.name.clone()),
        Arc::new(policy),
    );
    Ok(())
}

/// Clear a policy, or an operator policy (`operator`). RabbitMQ's text
/// when there is none.
pub fn clear_policy(
    s: &mut State,
    ops: &mut Vec<RecordOp>,
    vhost: &str,
    name: &str,
    operator: bool,
) -> Result<(), String> {
    let (kind, map) = if operator {
        (OPERATOR_POLICY, &mut s.operator_policies)
    } else {
        (POLICY, &mut s.policies)
    };
    if map.remove(&(vhost.to_owned(), name.to_owned())).is_none() {
        return Err("Parameter does not exist".into());
    }
    ops.push(del(kind, perm_key(vhost, name)));
    Ok(())
}
