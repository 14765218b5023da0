package agent

// Registration and authority through the Kubernetes API server.
//
// The agent renews a Lease "tandem-agent-<node>" in the operator namespace as
// its heartbeat; the Lease's annotations carry its control, replication and
// NBD endpoints, so the controller finds agents without kubelet-managed Pods.
//
// For every volume it serves as primary, the agent renews the per-pair
// authority Lease (v1alpha1.AuthorityLeaseName) while it names this node as
// holder at the volume's epoch. Writes are accepted only until the last
// successful renewal plus the lease duration (KubeAuthority.Authorized): an
// agent cut off from the API server fences itself before the controller
// promotes the backup, which it does only after the Lease has expired.
//
// Renewal cost: one request per primary volume and second, a JSON patch of
// renewTime whose test operations make it apply only while the Lease still
// names this node at the volume's epoch (renewPatch): no read first, no
// conflict with the controller, which moves the authority with a conditional
// update. Only a refused patch costs a Get, which shows the new holder and
// fences the volume. The volumes are renewed concurrently (at most
// renewParallel at a time, one renewal per volume in flight), so a node
// serving many primaries renews each of them about every second, not one
// after another. A renewal may take up to the Lease duration less a second
// (renewTimeout): a slow API server delays the grant but does not fence the
// writer while answers come within that.

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	coordclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/utils/ptr"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

// Agent heartbeat timing.
const (
	AgentLeaseDuration = 10 * time.Second
	agentRenewEvery    = 2 * time.Second
	authorityRenew     = time.Second
	apiTimeout         = 2 * time.Second
	renewParallel      = 8
	// defaultAuthorityLease is spec.failover.leaseDurationSeconds's
	// default, assumed for a Lease not read yet.
	defaultAuthorityLease = 6 * time.Second
)

// Endpoints are what the agent advertises on its Lease.
type Endpoints struct {
	Control, Replication, NBD string
}

// Register creates and renews the agent's Lease until ctx is done.
func Register(ctx context.Context, leases coordclient.LeasesGetter, namespace, node string, ep Endpoints, log logLike) {
	name := v1.AgentLeaseName(node)
	t := time.NewTicker(agentRenewEvery)
	defer t.Stop()
	failing := false
	for {
		err := renewAgentLease(ctx, leases.Leases(namespace), name, node, ep)
		switch {
		case err != nil && !failing:
			log.Error(err, "Cannot renew the agent Lease", "lease", name)
			failing = true
		case err == nil && failing:
			log.Info("Agent Lease renewed again", "lease", name)
			failing = false
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

type logLike interface {
	Info(msg string, kv ...any)
	Error(err error, msg string, kv ...any)
}

func renewAgentLease(ctx context.Context, c coordclient.LeaseInterface, name, node string, ep Endpoints) error {
	// Half the Lease: a slow API server delays the heartbeat, a renewal
	// that lands within that still keeps the Lease current.
	ctx, cancel := context.WithTimeout(ctx, AgentLeaseDuration/2)
	defer cancel()
	now := metav1.NewMicroTime(time.Now())
	ann := map[string]string{
		v1.AnnControlEndpoint:     ep.Control,
		v1.AnnReplicationEndpoint: ep.Replication,
		v1.AnnNBDEndpoint:         ep.NBD,
	}
	l, err := c.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		l = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann,
				Labels: map[string]string{v1.LabelComponent: "agent", v1.LabelNode: node}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(node), LeaseDurationSeconds: ptr.To(int32(AgentLeaseDuration / time.Second)),
				AcquireTime: &now, RenewTime: &now},
		}
		_, err = c.Create(ctx, l, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create agent Lease %s: %w", name, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("get agent Lease %s: %w", name, err)
	}
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	for k, v := range ann {
		l.Annotations[k] = v
	}
	l.Spec.HolderIdentity = ptr.To(node)
	l.Spec.LeaseDurationSeconds = ptr.To(int32(AgentLeaseDuration / time.Second))
	l.Spec.RenewTime = &now
	if _, err := c.Update(ctx, l, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("renew agent Lease %s: %w", name, err)
	}
	return nil
}

// KubeAuthority is a volume.Authority backed by the per-pair Leases.
type KubeAuthority struct {
	leases    coordclient.LeaseInterface
	node      string
	namespace string

	mu        sync.Mutex
	grants    map[string]grant
	durations map[string]time.Duration // each volume's Lease duration, once renewed
	kick      chan struct{}
}

type grant struct {
	epoch  uint64
	until  time.Time
	reason string
}

// NewKubeAuthority returns an authority for node's volumes.
func NewKubeAuthority(leases coordclient.LeasesGetter, namespace, node string) *KubeAuthority {
	return &KubeAuthority{leases: leases.Leases(namespace), node: node, namespace: namespace,
		grants: map[string]grant{}, durations: map[string]time.Duration{}, kick: make(chan struct{}, 1)}
}

// Authorized implements volume.Authority.
func (k *KubeAuthority) Authorized(vol string, epoch uint64) error {
	k.mu.Lock()
	g, ok := k.grants[vol]
	k.mu.Unlock()
	switch {
	case !ok:
		k.Kick()
		return fmt.Errorf("authority Lease not yet renewed by this node")
	case g.reason != "" && time.Now().After(g.until):
		return fmt.Errorf("no authority: %s", g.reason)
	case g.epoch != epoch:
		return fmt.Errorf("authority Lease is at epoch %d, not %d", g.epoch, epoch)
	case time.Now().After(g.until):
		return fmt.Errorf("authority Lease not renewed since %s (self-fenced)", g.until.Add(-time.Second).Format(time.RFC3339))
	}
	return nil
}

// Kick asks the renewal loop to run now (a volume just became primary).
func (k *KubeAuthority) Kick() {
	select {
	case k.kick <- struct{}{}:
	default:
	}
}

// Run renews the authority Lease of every volume primaries() returns until
// ctx is done. Every round (a second, or a Kick) starts a renewal of each
// primary volume that has none in flight, so one slow renewal does not hold
// back the others' next round; a renewal that took longer than a round is
// followed at once by the next one for that volume.
func (k *KubeAuthority) Run(ctx context.Context, primaries func() map[string]uint64, log logLike) {
	t := time.NewTicker(authorityRenew)
	defer t.Stop()
	sem := make(chan struct{}, renewParallel)
	var wg sync.WaitGroup
	defer wg.Wait()
	var mu sync.Mutex
	inflight := map[string]bool{}
	for {
		prim := primaries()
		k.forget(prim)
		for vol, epoch := range prim {
			mu.Lock()
			busy := inflight[vol]
			inflight[vol] = true
			mu.Unlock()
			if busy {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() {
					mu.Lock()
					delete(inflight, vol)
					mu.Unlock()
				}()
				select {
				case sem <- struct{}{}:
				case <-ctx.Done():
					return
				}
				defer func() { <-sem }()
				for ctx.Err() == nil {
					start := time.Now()
					if err := k.renew(ctx, vol, epoch); err != nil {
						log.Info("Authority not renewed", "volume", vol, "epoch", epoch, "reason", err.Error())
					}
					if time.Since(start) < authorityRenew {
						return
					}
					// A slow renewal: the next round may be most of a
					// second away, renew again now while it is still a
					// primary.
					var ok bool
					if epoch, ok = primaries()[vol]; !ok {
						return
					}
				}
			}()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-k.kick:
		}
	}
}

// renewTimeout bounds one renewal of a Lease lasting dur: the Lease
// duration less a round, at least apiTimeout. A late answer is still worth
// having, since the grant it brings runs from the renewal's start. With the
// default 6 s Lease and renewals back to back, an API server answering in
// up to about 3 s keeps the writer's authority, where a fixed 2 s timeout
// let every renewal fail and fenced it.
func renewTimeout(dur time.Duration) time.Duration {
	return max(apiTimeout, dur-authorityRenew)
}

func (k *KubeAuthority) renew(ctx context.Context, vol string, epoch uint64) error {
	ns, name, ok := cutName(vol)
	if !ok {
		return fmt.Errorf("bad volume name %q", vol)
	}
	lname := v1.AuthorityLeaseName(ns, name)
	start := time.Now()
	k.mu.Lock()
	dur, known := k.durations[vol]
	k.mu.Unlock()
	if !known {
		dur = defaultAuthorityLease // not renewed yet: the VolumePair default
	}
	ctx, cancel := context.WithTimeout(ctx, renewTimeout(dur))
	defer cancel()
	patch, err := renewPatch(k.node, epoch, start)
	if err != nil {
		return err
	}
	l, err := k.leases.Patch(ctx, lname, types.JSONPatchType, patch, metav1.PatchOptions{})
	if err == nil {
		if holder, lepoch := holderAt(l); holder != k.node || lepoch != epoch {
			// Cannot happen (the patch tests both); never grant on it.
			return fmt.Errorf("renewed authority Lease %s names %q at epoch %d", lname, holder, lepoch)
		}
		dur = time.Duration(ptr.Deref(l.Spec.LeaseDurationSeconds, 6)) * time.Second
		k.mu.Lock()
		k.grants[vol] = grant{epoch: epoch, until: start.Add(dur)}
		k.durations[vol] = dur
		k.mu.Unlock()
		return nil
	}
	if ctx.Err() != nil {
		return fmt.Errorf("renew authority Lease %s: %w", lname, err)
	}
	// Refused (most likely a test failed: the controller moved the
	// authority) or not sent: read the Lease to know, and fence the volume
	// if it names someone else.
	cur, gerr := k.leases.Get(ctx, lname, metav1.GetOptions{})
	if gerr != nil {
		return fmt.Errorf("renew authority Lease %s: %w (and reading it: %w)", lname, err, gerr)
	}
	holder, lepoch := holderAt(cur)
	if holder == k.node && lepoch == epoch {
		return fmt.Errorf("renew authority Lease %s: %w", lname, err)
	}
	reason := fmt.Sprintf("authority Lease %s names %q at epoch %d", lname, holder, lepoch)
	k.mu.Lock()
	g := k.grants[vol]
	g.reason = reason
	if g.epoch != epoch {
		g.until = time.Time{}
	}
	k.grants[vol] = g
	k.mu.Unlock()
	return fmt.Errorf("%s", reason)
}

// holderAt is the node an authority Lease names and the epoch it names it at.
func holderAt(l *coordinationv1.Lease) (string, uint64) {
	epoch, _ := strconv.ParseUint(l.Annotations[v1.AnnEpoch], 10, 64)
	return ptr.Deref(l.Spec.HolderIdentity, ""), epoch
}

// renewPatch is the JSON patch (RFC 6902) that renews an authority Lease
// from start: it applies only while the Lease names node at epoch (its test
// operations are checked by the API server on the current object, in the
// same update), so no read is needed first and a move by the controller
// makes it fail instead of being overwritten.
func renewPatch(node string, epoch uint64, start time.Time) ([]byte, error) {
	type op struct {
		Op    string `json:"op"`
		Path  string `json:"path"`
		Value any    `json:"value"`
	}
	epochPath := "/metadata/annotations/" + strings.ReplaceAll(strings.ReplaceAll(v1.AnnEpoch, "~", "~0"), "/", "~1")
	b, err := json.Marshal([]op{
		{Op: "test", Path: "/spec/holderIdentity", Value: node},
		{Op: "test", Path: epochPath, Value: strconv.FormatUint(epoch, 10)},
		{Op: "add", Path: "/spec/renewTime", Value: metav1.NewMicroTime(start)},
	})
	if err != nil {
		return nil, fmt.Errorf("encode the renewal patch: %w", err)
	}
	return b, nil
}

// forget drops what is kept of volumes that are no longer primaries.
func (k *KubeAuthority) forget(primaries map[string]uint64) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for vol := range k.durations {
		if _, ok := primaries[vol]; !ok {
			delete(k.durations, vol)
		}
	}
}

func cutName(vol string) (string, string, bool) {
	for i := 0; i < len(vol); i++ {
		if vol[i] == '/' {
			return vol[:i], vol[i+1:], i > 0 && i < len(vol)-1
		}
	}
	return "", "", false
}

// Primaries returns the volumes this agent serves as primary, with epochs:
// those whose authority Lease it renews. A primary with a fault (its
// write-intent journal failed) is left out until the fault clears: if it
// lasts, its Lease expires and the controller fails over.
func (a *Agent) Primaries() map[string]uint64 {
	out := map[string]uint64{}
	for _, v := range a.list() {
		if s := v.Spec(); s.Role == volume.RolePrimary && v.Fault() == nil {
			out[v.Name()] = s.Epoch
		}
	}
	return out
}
