//! A pod's status as kubelet reports it, from what the kubelet knows of its containers: the
//! phase, the conditions (carrying transition times over from the previous status) and the
//! container statuses. Pure.

use std::net::IpAddr;

use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: String,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        message: Option<String>,
        started_at: String,
        finished_at: String,
    },
}

impl State {
    pub fn waiting(reason: &str, message: Option<String>) -> Self {
        State::Waiting {
            reason: reason.into(),
            message,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            State::Waiting { reason, message } => {
                let mut w = json!({"reason": reason});
                if let Some(m) = message {
                    w["message"] = json!(m);
                }
                json!({"waiting": w})
            }
            State::Running { started_at } => json!({"running": {"startedAt": started_at}}),
            State::Terminated {
                exit_code,
                signal,
                reason,
                message,
                started_at,
                finished_at,
            } => {
                let mut t = json!({"exitCode": exit_code, "reason": reason,
                                   "startedAt": started_at, "finishedAt": finished_at});
                if let Some(s) = signal {
                    t["signal"] = json!(s);
                }
                if let Some(m) = message {
                    t["message"] = json!(m);
                }
                json!({"terminated": t})
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    pub state: State,
    pub last_state: Option<State>,
    pub ready: bool,
    pub started: bool,
    pub restart_count: i32,
    pub container_id: Option<String>,
}

impl ContainerView {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "image": self.image,
            "imageID": format!("kpx-catalog://{}", self.image),
            "state": self.state.to_json(),
            "lastState": self.last_state.as_ref().map(State::to_json).unwrap_or(json!({})),
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
        });
        if let Some(id) = &self.container_id {
            v["containerID"] = json!(id);
        }
        v
    }

    fn never_ran(&self) -> bool {
        matches!(self.state, State::Waiting { .. }) && self.last_state.is_none()
    }

    fn exit_code(&self) -> Option<i32> {
        match (&self.state, &self.last_state) {
            (State::Terminated { exit_code, .. }, _) => Some(*exit_code),
            (State::Waiting { .. }, Some(State::Terminated { exit_code, .. })) => Some(*exit_code),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub sandbox_ready: bool,
    pub ips: Vec<IpAddr>,
    pub host_ips: Vec<IpAddr>,
    pub start_time: Option<String>,
    pub init_containers: Vec<ContainerView>,
    pub containers: Vec<ContainerView>,
    pub initialized: bool,
    pub restart_policy: String,
    /// Every container ended and none will run again.
    pub finished: bool,
}

/// The phase, as kubelet's getPhase decides it.
pub fn phase(view: &PodView) -> &'static str {
    if view.finished {
        let failed = view
            .containers
            .iter()
            .any(|c| c.exit_code().is_some_and(|code| code != 0));
        return if failed { "Failed" } else { "Succeeded" };
    }
    if !view.initialized || view.containers.iter().any(ContainerView::never_ran) {
        return "Pending";
    }
    "Running"
}

/// The status to write; `previous` is the pod's current status (conditions others set, such
/// as `PodScheduled`, are kept; unchanged conditions keep their transition time).
pub fn status(view: &PodView, previous: &Value, now: &str) -> Value {
    let phase = phase(view);
    let containers_ready = !view.containers.is_empty()
        && view.containers.iter().all(|c| c.ready)
        && phase == "Running";
    let not_ready: Vec<&str> = view
        .containers
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    let unready_message = format!("containers with unready status: [{}]", not_ready.join(" "));
    let prev_conditions = previous["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let condition = |type_: &str, ok: bool, reason: Option<&str>, message: Option<&str>| {
        let status = if ok { "True" } else { "False" };
        let since = prev_conditions
            .iter()
            .find(|c| c["type"] == type_ && c["status"] == status)
            .and_then(|c| c["lastTransitionTime"].as_str())
            .unwrap_or(now)
            .to_string();
        let mut c = json!({"type": type_, "status": status, "lastProbeTime": null,
                           "lastTransitionTime": since});
        if !ok {
            if let Some(r) = reason {
                c["reason"] = json!(r);
            }
            if let Some(m) = message {
                c["message"] = json!(m);
            }
        }
        c
    };
    let (ready_reason, ready_message) = if phase == "Succeeded" || phase == "Failed" {
        ("PodCompleted", None)
    } else {
        ("ContainersNotReady", Some(unready_message.as_str()))
    };
    let mut conditions = vec![
        condition("PodReadyToStartContainers", view.sandbox_ready, None, None),
        condition(
            "Initialized",
            view.initialized,
            Some("ContainersNotInitialized"),
            Some("containers with incomplete status: init containers"),
        ),
        condition("Ready", containers_ready, Some(ready_reason), ready_message),
        condition(
            "ContainersReady",
            containers_ready,
            Some(ready_reason),
            ready_message,
        ),
    ];
    conditions.extend(
        prev_conditions
            .iter()
            .filter(|c| c["type"] == "PodScheduled")
            .cloned(),
    );
    let ips: Vec<Value> = view
        .ips
        .iter()
        .map(|ip| json!({"ip": ip.to_string()}))
        .collect();
    let host_ips: Vec<Value> = view
        .host_ips
        .iter()
        .map(|ip| json!({"ip": ip.to_string()}))
        .collect();
    let mut status = json!({
        "phase": phase,
        "conditions": conditions,
        "hostIP": view.host_ips.first().map(ToString::to_string),
        "hostIPs": host_ips,
        "containerStatuses": view.containers.iter().map(ContainerView::to_json).collect::<Vec<_>>(),
        "qosClass": previous.get("qosClass").cloned().unwrap_or(json!("BestEffort")),
    });
    if !view.ips.is_empty() {
        status["podIP"] = json!(view.ips[0].to_string());
        status["podIPs"] = json!(ips);
    }
    if let Some(t) = &view.start_time {
        status["startTime"] = json!(t);
    }
    if !view.init_containers.is_empty() {
        status["initContainerStatuses"] = json!(view
            .init_containers
            .iter()
            .map(ContainerView::to_json)
            .collect::<Vec<_>>());
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(state: State, ready: bool) -> ContainerView {
        ContainerView {
            name: "web".into(),
            image: "nginx".into(),
            state,
            last_state: None,
            ready,
            started: true,
            restart_count: 0,
            container_id: Some("kpx://1".into()),
        }
    }

    fn view(containers: Vec<ContainerView>) -> PodView {
        PodView {
            sandbox_ready: true,
            ips: vec!["198.19.1.2".parse().expect("ip")],
            host_ips: vec!["198.18.0.11".parse().expect("ip")],
            start_time: Some("t0".into()),
            init_containers: vec![],
            containers,
            initialized: true,
            restart_policy: "Always".into(),
            finished: false,
        }
    }

    fn cond(status: &Value, type_: &str) -> Value {
        status["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
            .expect("condition present")
    }

    #[test]
    fn running_and_ready() {
        let running = State::Running {
            started_at: "t1".into(),
        };
        let previous = json!({"conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": "t-1"},
            {"type": "Ready", "status": "False", "lastTransitionTime": "t0"}]});
        let s = status(
            &view(vec![container(running.clone(), true)]),
            &previous,
            "t2",
        );
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["podIP"], "198.19.1.2");
        assert_eq!(cond(&s, "Ready")["status"], "True");
        assert_eq!(
            cond(&s, "Ready")["lastTransitionTime"],
            "t2",
            "it changed now"
        );
        assert_eq!(
            cond(&s, "PodScheduled")["lastTransitionTime"],
            "t-1",
            "kept"
        );
        let not_ready = status(&view(vec![container(running, false)]), &s, "t3");
        let ready = cond(&not_ready, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["message"], "containers with unready status: [web]");
        assert_eq!(
            not_ready["containerStatuses"][0]["state"]["running"]["startedAt"],
            "t1"
        );
    }

    #[test]
    fn phases() {
        let waiting = State::waiting("ErrImagePull", Some("not in the catalog".into()));
        let v = view(vec![container(waiting, false)]);
        let s = status(&v, &json!({}), "t");
        assert_eq!(s["phase"], "Pending");
        assert_eq!(
            s["containerStatuses"][0]["state"]["waiting"]["reason"],
            "ErrImagePull"
        );
        let done = |code| State::Terminated {
            exit_code: code,
            signal: None,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at: "a".into(),
            finished_at: "b".into(),
        };
        let mut v = view(vec![container(done(0), false)]);
        v.finished = true;
        assert_eq!(phase(&v), "Succeeded");
        let mut v = view(vec![container(done(1), false)]);
        v.finished = true;
        assert_eq!(phase(&v), "Failed");
        // Crash-looping: waiting again after a termination is Running.
        let mut looping = container(State::waiting("CrashLoopBackOff", None), false);
        looping.last_state = Some(done(1));
        assert_eq!(phase(&view(vec![looping])), "Running");
    }
}
