// Package csi is Tandem's CSI driver, csi.tandem.dev (CSI spec v1): the
// controller service runs next to the manager, the node service in the
// agent DaemonSet, both served by Tandem's own binaries.
//
// # Volumes
//
// A CSI volume is a VolumePair in the driver's namespace (the operator's,
// so that a PersistentVolume with reclaimPolicy Retain outlives the
// claim's namespace). Its volume ID is the VolumePair's name, or
// "<namespace>/<name>" for a VolumePair elsewhere (a statically bound PV).
// CreateVolume names the VolumePair after the request's name when that is a
// DNS label of at most 63 characters ("pvc-<uid>" from the provisioner), else
// "tv-" and a hash of it; the request's name is kept in the annotation
// csi.tandem.dev/volume-name, which makes CreateVolume idempotent.
//
// # StorageClass parameters
//
// mode (Sync, Async; default Sync), regionSize (a quantity), failoverPolicy,
// failbackPolicy (Automatic, Manual), leaseDurationSeconds,
// probePeriodSeconds, failureThreshold, resyncMaxBytesPerSecond,
// mergePrimaryBitmap (true, false), podFailover (true, false; default true:
// see the workload failover in docs/install.md). The keys the provisioner
// adds (csi.storage.k8s.io/pvc/name, .../pvc/namespace, .../pv/name) label
// the VolumePair. Any other key is refused, naming it: a typo must not
// silently give a volume other properties than the class says.
//
// # Placement and topology
//
// Both members are nodes with a live agent (its Lease current), distinct,
// with the free space the agent advertises (storage.tandem.dev/free-bytes on
// its Lease) at least the volume's size, allowed by the request's requisite
// topology. The first preferred topology that is eligible is the primary
// (with WaitForFirstConsumer the provisioner puts the pod's node first); the
// backup is the eligible node with the most free space. The topology key is
// csi.tandem.dev/node (a node's name); a volume is accessible from its two
// members, so its pods are scheduled there. Of the two, a Pod created while
// the pair has a writer prefers the writer's node: the PodPlacement webhook
// (podplacement.go) adds a preferred node affinity term for it, never
// refusing a Pod (failurePolicy Ignore; a failed lookup only warns).
//
// # Node service
//
// NodeStageVolume first fences the volume to its node: the node becomes the
// pair's only client node (spec.clients, as ControllerPublishVolume does),
// refused while another node is, and the call goes on once the writer
// refuses every other node; NodeUnstageVolume releases it after detaching.
// The CSIDriver therefore has no attach step (attachRequired: false); the
// attacher (attacher.go) still carries out the VolumeAttachments of a
// CSIDriver created with one. Then NodeStageVolume attaches the volume to
// the node as a block device through
// an Attacher (the kernel's NBD client where the kernel has one, else a
// user-space NBD client behind a FUSE file with a loop device on it: see
// attach.go) that follows the pair's writer, formats it when it holds no
// filesystem (ext4 by default, xfs) and mounts it at the staging path;
// NodePublishVolume bind-mounts that (or, for volumeMode Block, the device)
// at the pod's target path. What is staged is recorded in the node's state
// directory so that unstaging after a restart knows what to undo.
//
// # Expansion
//
// Volumes grow online. The Resizer (resizer.go, the external-resizer's work
// and PVC status protocol) calls ControllerExpandVolume for a claim asking
// for more than it has: the VolumePair's spec.size grows (whole regions,
// never shrinking), the agents grow the replicas, and the VolumePair's
// status.size says when every member serves the new size (ServedSizeOf).
// NodeExpandVolume waits for that (ExpandWait, then Unavailable for the
// kubelet to retry), has the Attacher grow the device (Expander: a new NBD
// connection negotiates the new size, as NBD has no in-band resize) and
// grows the filesystem (resize2fs, xfs_growfs).
package csi
