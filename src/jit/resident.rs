//! The resident training state: a training step (`Backend::run_carrying`)
//! keeps the params and optimizer state in the frame's buffers for the
//! next step instead of copying them out (`Resident`), and moves them to
//! host copies (`Evicted`) when other work needs the frame. Also the step
//! itself: copy the leaves in, make the one call, copy the wanted values
//! out.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::interp::{self, Context, Evaluation, InterpError, Tensor};
use crate::ir::{Graph, IdMap, NodeId, expand};
use crate::jit::Jit;
use crate::jit::bind::internal;
use crate::jit::bind::own_id;
use crate::jit::bind::slot_in;
use crate::jit::bind::{self, Bound};
use crate::jit::host::StepHost;
use crate::jit::program::ProgramKey;
use crate::train::{Carried, Kept};

/// Training state kept in a frame: the leaf buffers hold the values the
/// last step started from, the update buffers those it computed.
pub(super) struct Resident {
    pub(super) ticket: u64,
    /// Whether the update buffers hold computed values (false after a
    /// failed step).
    pub(super) computed: bool,
    pub(super) key: ProgramKey,
    pub(super) dims: BTreeMap<String, usize>,
    /// Each state's name, its leaf and its update, as the program's ids.
    pub(super) carried: CarriedState,
}

/// Kept state moved out of its frame: the values its step computed, or
/// (after a failed step) those it started from. (A session fetches the
/// values a step started from right after that step, so the computed
/// values are all a later step needs.)
pub(super) struct Evicted {
    pub(super) values: BTreeMap<String, Tensor>,
    pub(super) computed: bool,
}

impl Jit {
    /// One step: checks and copies the leaves in, makes the entry's one
    /// call, and copies out every materialized value (or only `wanted`).
    /// With `carrying`, the carried state may stay in the frame
    /// (`Backend::run_carrying`).
    pub(super) fn step(
        &mut self,
        graph: &Graph,
        leaves: &BTreeMap<String, Tensor>,
        context: Context,
        wanted: Option<&[NodeId]>,
        carrying: Option<(&[Carried], &mut Option<Kept>)>,
    ) -> Result<Evaluation, InterpError> {
        let key = self.compiled(graph, wanted)?;
        let program = self
            .programs
            .get(&key)
            .ok_or_else(|| InterpError::Internal("the program vanished".into()))?;
        // From here on, the graph the program runs (whose leaves are the
        // caller's, with the same ids).
        let run = Arc::clone(&program.graph);
        let own = |id: NodeId| own_id(&program.ids, id);
        // Every value to copy out is computed by the program (checked
        // before anything runs; copied out by `own` again at the end).
        let wanted_here: Option<Vec<NodeId>> = match wanted {
            Some(wanted) => Some(wanted.iter().map(|&id| own(id)).collect::<Result<_, _>>()?),
            None => None,
        };
        // Each carried state's name, leaf and update (the program's id):
        // the list the state kept in the frame has, if it is the same.
        let carried = match &carrying {
            Some((carried, _)) => Some(self.carried_state(carried, &own)?),
            None => None,
        };
        let kept = carrying.map(|(_, kept)| kept);
        let carried_list: &[(String, NodeId, NodeId)] = carried.as_deref().unwrap_or(&[]);
        // The interpreter's checks of every leaf, binding the sizes.
        let mut dims = BTreeMap::new();
        let bound_leaves = interp::checked_leaves(&run, &program.leaves, leaves, &mut dims)?;
        for shape in &program.checked_shapes {
            let sizes = interp::concrete(shape, &dims)?;
            expand::check_statistics(&sizes).map_err(InterpError::Runtime)?;
        }
        let graph = &*run;
        // Where the state this step resumes is: in this frame, moved out
        // of its frame, or (a fresh start) in `leaves`.
        let resumed = kept.as_ref().and_then(|k| k.map(|k| k.ticket));
        let (in_frame, from_evicted) = self.resume(&key, &dims, resumed, kept.is_some())?;
        // (The field, not `program_at`: the step goes on to update the
        // kept state while it holds the frame.)
        let program = self
            .programs
            .get_mut(&key)
            .ok_or_else(|| InterpError::Internal("the program vanished".into()))?;
        let bound = bind::bound(
            program,
            self.frames.entry(key.clone()).or_default(),
            graph,
            &dims,
        )?;
        let ids = &program.ids;
        let sources = LeafSources {
            leaves: bound_leaves,
            from_evicted: from_evicted.as_ref(),
            in_frame,
            carried: carried_list,
            wanted: wanted_here.as_deref(),
        };
        write_leaves(bound, graph, sources)?;
        // From here on the frame holds what this step starts from.
        let ticket = if let (Some(kept), Some(carried)) = (kept, carried) {
            self.tickets += 1;
            if let Some(t) = resumed {
                self.evicted.remove(&t);
            }
            // (The kept sizes and key again if they are the same: no copy.)
            let (key, dims) = match self.resident.take() {
                Some(r) if r.key == key && r.dims == dims => (r.key, r.dims),
                _ => (key.clone(), dims.clone()),
            };
            self.resident = Some(Resident {
                ticket: self.tickets,
                computed: false,
                key,
                dims,
                carried,
            });
            *kept = Some(Kept {
                ticket: self.tickets,
                computed: false,
            });
            Some(kept)
        } else {
            None
        };
        let (mut host, frame) = StepHost::of(graph, bound, context);
        frame.run(&mut host, context)?;
        // Every materialized value out (or the wanted ones), as the
        // interpreter's tensors.
        // (Into the tensors of an evaluation handed back, `recycle`.)
        let mut evaluation = self.spare.take().unwrap_or_default();
        evaluation.dims = dims;
        copy_out(bound, graph, ids, wanted, &mut evaluation)?;
        if let Some(kept) = ticket {
            if let Some(resident) = &mut self.resident {
                resident.computed = true;
            }
            *kept = Some(Kept {
                ticket: self.tickets,
                computed: true,
            });
        }
        Ok(evaluation)
    }

    /// Makes room for a step of program `key` at `dims` that resumes the
    /// state of ticket `resumed` (if any) and `keeps` its own: state kept
    /// in a frame leaves it (`evict`) unless this step resumes it in
    /// place. Returns whether the state is resumed in place, else the
    /// copies it is resumed from (none for a fresh start).
    #[allow(
        clippy::type_complexity,
        reason = "the two places state may be resumed from"
    )]
    fn resume(
        &mut self,
        key: &ProgramKey,
        dims: &BTreeMap<String, usize>,
        resumed: Option<u64>,
        keeps: bool,
    ) -> Result<(bool, Option<BTreeMap<String, Tensor>>), InterpError> {
        let here = |r: &Resident| &r.key == key && &r.dims == dims;
        let in_frame = matches!(
            (&self.resident, resumed),
            (Some(r), Some(t)) if r.ticket == t && r.computed && here(r)
        );
        // (State that is gone: an error before anything moves.)
        if let Some(t) = resumed {
            let resident = self.resident.as_ref().is_some_and(|r| r.ticket == t);
            if !resident && !self.evicted.contains_key(&t) {
                return Err(InterpError::Internal(
                    "the state this step resumes is gone".into(),
                ));
            }
        }
        // Kept state that this step does not resume in place leaves its
        // frame first if this step will keep its own (one frame keeps
        // state at a time), uses its frame, or binds a new frame (which may
        // drop the others).
        let new_frame = !self.frames.get(key).is_some_and(|f| f.contains_key(dims));
        // (The copies this step resumes from are set aside meanwhile, so
        // that evicting cannot drop them as the oldest.)
        let held = resumed.and_then(|t| Some((t, self.evicted.remove(&t)?)));
        if !in_frame
            && self
                .resident
                .as_ref()
                .is_some_and(|r| keeps || here(r) || (new_frame && &r.key == key))
        {
            self.evict();
        }
        if let Some((t, copies)) = held {
            self.evicted.insert(t, copies);
        }
        let from_evicted = match resumed {
            Some(t) if !in_frame => Some(
                self.evicted
                    .get(&t)
                    .filter(|e| e.computed)
                    .map(|e| e.values.clone())
                    .ok_or_else(|| {
                        InterpError::Internal("the state this step resumes is gone".into())
                    })?,
            ),
            _ => None,
        };
        Ok((in_frame, from_evicted))
    }

    /// Each carried state's name, leaf and update (the program's id, by
    /// `own`): the list the state kept in the frame has, if it is the same.
    fn carried_state(
        &self,
        carried: &[Carried],
        own: &dyn Fn(NodeId) -> Result<NodeId, InterpError>,
    ) -> Result<CarriedState, InterpError> {
        let same = self.resident.as_ref().is_some_and(|r| {
            r.carried.len() == carried.len()
                && r.carried.iter().zip(carried.iter()).all(|(kept, c)| {
                    kept.0 == c.name && kept.1 == c.leaf && own(c.update).is_ok_and(|u| u == kept.2)
                })
        });
        match &self.resident {
            Some(r) if same => Ok(Arc::clone(&r.carried)),
            _ => carried
                .iter()
                .map(|c| Ok((c.name.clone(), c.leaf, own(c.update)?)))
                .collect(),
        }
    }

    /// The kept state of a ticket, read from its frame or its copies.
    pub(super) fn kept_values(
        &self,
        kept: &Kept,
        computed: bool,
    ) -> Result<BTreeMap<String, Tensor>, InterpError> {
        let missing = || InterpError::Internal("the kept state is gone".into());
        match &self.resident {
            Some(resident) if resident.ticket == kept.ticket => {
                if computed && !resident.computed {
                    return Err(missing());
                }
                let program = self.programs.get(&resident.key).ok_or_else(missing)?;
                let bound = self
                    .frames
                    .get(&resident.key)
                    .and_then(|f| f.get(&resident.dims))
                    .ok_or_else(missing)?;
                resident
                    .carried
                    .iter()
                    .map(|(name, leaf, update)| {
                        let id = if computed { *update } else { *leaf };
                        Ok((name.clone(), bound.value(&program.graph, id)?))
                    })
                    .collect()
            }
            _ => {
                let evicted = self.evicted.get(&kept.ticket).ok_or_else(missing)?;
                if evicted.computed == computed {
                    Ok(evicted.values.clone())
                } else {
                    Err(missing())
                }
            }
        }
    }
}

/// Each carried state's name, leaf and update, in the program's ids.
pub(super) type CarriedState = Arc<[(String, NodeId, NodeId)]>;

/// What a step's leaves are written from.
struct LeafSources<'a> {
    /// The leaves as the interpreter's checks bound them.
    leaves: Vec<(NodeId, &'a Tensor)>,
    /// The kept state's copies, if the step resumes from them.
    from_evicted: Option<&'a BTreeMap<String, Tensor>>,
    /// Whether the step resumes the state kept in this frame.
    in_frame: bool,
    /// Each carried state's name, leaf and update.
    carried: &'a [(String, NodeId, NodeId)],
    /// The values the caller reads back (none: all).
    wanted: Option<&'a [NodeId]>,
}

/// Writes a step's leaves into the frame: the kept state becomes what the
/// step starts from (each update's buffer exchanged with its leaf's in
/// the frame, or the leaves written from their copies; those leaves are
/// not written from `leaves`), and every other leaf that is read or
/// wanted is converted as the interpreter converts it.
fn write_leaves(
    bound: &mut Bound,
    graph: &Graph,
    sources: LeafSources<'_>,
) -> Result<(), InterpError> {
    let slot = |id: NodeId| slot_in(&bound.slots, id);
    let mut buffers = bound.frame.buffers();
    // The kept state becomes what this step starts from: each update's
    // buffer exchanged with its leaf's in the frame (this step's update
    // overwrites the leaf's old values), or the leaves written from
    // their copies; those leaves are not written from `leaves`.
    let skipped = |id: NodeId| {
        (sources.in_frame || sources.from_evicted.is_some())
            && sources.carried.iter().any(|c| c.1 == id)
    };
    if let Some(values) = sources.from_evicted {
        for (name, leaf, _) in sources.carried {
            let value = values
                .get(name)
                .ok_or_else(|| InterpError::Internal(format!("no kept value for `{name}`")))?;
            buffers.write(slot(*leaf)?, &value.data).map_err(internal)?;
        }
    }
    // The leaves into their buffers, converted as the interpreter
    // converts them (an `f32` leaf rounded to `f32`).
    // (`checked_leaves` has matched their sizes to the shapes the
    // buffers were made for.)
    // A leaf nothing reads and nobody wants back (a frozen param the
    // model never uses) is not copied: it would cost its size every
    // step for nothing.
    let unread =
        |id: NodeId| sources.wanted.is_some_and(|w| !w.contains(&id)) && graph.users(id).is_empty();
    for (id, tensor) in sources.leaves {
        let Some(&slot) = bound.slots.get(&id) else {
            continue;
        };
        if skipped(id) || unread(id) {
            continue;
        }
        buffers.write(slot, &tensor.data).map_err(internal)?;
    }
    // (Exchanged last, once nothing can fail before the new ticket:
    // until then the kept state is where its ticket says.)
    if sources.in_frame {
        for (_, leaf, update) in sources.carried {
            let (from, to) = (slot(*update)?, slot(*leaf)?);
            if buffers.swap(from, to).is_err() {
                // (Stored otherwise: copied, converted.)
                let values = buffers.read(from, usize::MAX).into_owned();
                buffers.write(to, &values).map_err(internal)?;
            }
        }
    }
    Ok(())
}

/// Copies the values out of the frame into `evaluation` (into its tensors
/// where it holds them already: `recycle`): the wanted ones (`ids` maps
/// the caller's to the program's), or every materialized value.
fn copy_out(
    bound: &mut Bound,
    graph: &Graph,
    ids: &IdMap<NodeId>,
    wanted: Option<&[NodeId]>,
    evaluation: &mut Evaluation,
) -> Result<(), InterpError> {
    match wanted {
        Some(wanted) => {
            bound.want(graph, ids, wanted)?;
            let outputs = bound.wanted.as_ref().map_or(&[][..], |w| &w.outputs[..]);
            // (An evaluation handed back holds these values already.)
            let same = evaluation.values.len() == outputs.len()
                && outputs.iter().all(|o| evaluation.values.contains_key(&o.0));
            if !same {
                evaluation.values.retain(|id, _| wanted.contains(id));
            }
            for &(id, slot, dtype) in outputs {
                let tensor = evaluation.values.entry(id).or_insert_with(|| Tensor {
                    dtype,
                    shape: Vec::new(),
                    data: Vec::new(),
                });
                bound.refill_slot(slot, dtype, tensor);
            }
        }
        None => {
            evaluation.values.clear();
            evaluation.values.reserve(bound.values.len());
            for (id, _) in &bound.values {
                evaluation.values.insert(*id, bound.value(graph, *id)?);
            }
        }
    }
    Ok(())
}
