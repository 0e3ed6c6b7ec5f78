//! What the source's migration thread and the VM's controller say to each other: the thread
//! asks ([`MigEvent`]) through a callback ([`Controller`]) and never touches the VM itself; the
//! controller alone pauses, saves, collects dirty pages and resumes.

use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use page_server::ServerHandle;
use proto::Layout;

use super::{MigrationError, Offer, Plan};
use crate::api::replies::{MigrationReport, Progress};

/// The paused VM's state, from the controller.
pub struct Switch {
    /// State envelope.
    pub envelope: Vec<u8>,
    /// Source clock when the pause began.
    pub paused_at: u64,
    /// Pausing the vCPUs and saving their state.
    pub pause_ms: f64,
    /// Pages written since the last collection (dirty logging was on), as bitmap bytes.
    pub dirty: Vec<u8>,
}

/// Dirty logging requests to the controller (which owns the VM fd).
pub enum DirtyOp {
    /// Turn dirty tracking on with this backend.
    Start(crate::dirty::Backend),
    /// The pages written since the previous collection.
    Collect,
}

/// What the migration thread tells the controller.
pub enum MigEvent {
    /// Pause the VM now, save its state and answer.
    Switchover(SyncSender<Result<Switch, String>>),
    /// Dirty logging: answers the dirty pages (bitmap bytes) and their count.
    Dirty(DirtyOp, SyncSender<Result<(Vec<u8>, u64), String>>),
    /// A progress line for the caller.
    Progress(Progress),
    /// The migration failed and the destination never ran the VM: run it here (resume it if
    /// the migration paused it).
    Failed(String),
    /// The migration failed after the state went out and the destination may be running the
    /// VM: keep it paused here; the page-server keeps serving.
    Stuck(String, Vec<ServerHandle>),
    /// The destination has every page: free memory and exit.
    Done(Box<MigrationReport>),
}

/// What the thread needs from the VM.
pub struct Context {
    /// Destination.
    pub to: String,
    /// The offer, without the page-server address.
    pub offer: Offer,
    /// Host address and length of each RAM region.
    pub regions: Vec<(u64, u64)>,
    /// The RAM layout (guest-physical ranges).
    pub layout: Layout,
    /// The controller: takes each [`MigEvent`]; false once it is gone.
    pub events: Controller,
    /// Mode and pre-copy limits.
    pub plan: Plan,
    /// Set by `migrate-switchover`: end the pre-copy passes now.
    pub switchover: Arc<std::sync::atomic::AtomicBool>,
    /// How the link and the page-servers authenticate the destination and encrypt.
    pub security: transport::Security,
}

/// How the migration thread reaches the VM's controller (which wraps each [`MigEvent`] into an
/// event of its own): returns false once the controller is gone.
pub type Controller = Arc<dyn Fn(MigEvent) -> bool + Send + Sync>;

/// Asks the controller for a dirty-logging operation and waits for its answer.
pub(super) fn dirty_op(ctx: &Context, op: DirtyOp) -> Result<(Vec<u8>, u64), MigrationError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    if !(ctx.events)(MigEvent::Dirty(op, tx)) {
        return Err(MigrationError::Other("the VM is gone".into()));
    }
    rx.recv_timeout(Duration::from_secs(20))
        .map_err(|_| MigrationError::Other("the controller did not answer".into()))?
        .map_err(|e| MigrationError::Other(format!("dirty logging: {e}")))
}
