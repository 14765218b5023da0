package controllers

import (
	"context"
	"fmt"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/authority"
)

// readAuthority reads the pair's authority Lease live (nil if there is
// none).
//
// A pair created before Leases were named after the pair's UID has its Lease
// under the older name ("tandem-pair-<namespace>-<name>"); it is adopted
// once: created under the new name with the same holder, epoch and
// failed-over mark, and the old one deleted (authority.Adopt). A Lease of the
// older name that names this pair must be gone before the controller acts on
// the new one, since an agent not yet upgraded may still renew it and write
// under it: its deletion is checked once per pair and process, and until it
// succeeds the round fails. The new Lease's expiry counts from this
// controller's first sight of it, after that deletion, so a writer that
// renewed the old one has fenced itself before the new one can expire. A
// Lease of the older name that names another pair ("team/a-db" for
// "team-a/db"), or carries a UID, is left alone.
func (r *VolumePairReconciler) readAuthority(ctx context.Context, vp *v1.VolumePair) (*coordinationv1.Lease, error) {
	name, err := authority.LeaseName(vp.UID)
	if err != nil {
		return nil, err
	}
	key := client.ObjectKey{Namespace: r.Namespace, Name: name}
	lease := &coordinationv1.Lease{}
	err = r.APIReader.Get(ctx, key, lease)
	found := err == nil
	if err != nil && !apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("get authority Lease %s: %w", name, err)
	}
	r.mu.Lock()
	checked := r.legacyGone[vp.UID]
	r.mu.Unlock()
	if !checked {
		adopted, err := r.retireLegacy(ctx, vp, found)
		if err != nil {
			return nil, err
		}
		if adopted {
			if err := r.APIReader.Get(ctx, key, lease); err != nil {
				return nil, fmt.Errorf("get adopted authority Lease %s: %w", name, err)
			}
			found = true
		}
		r.mu.Lock()
		r.legacyGone[vp.UID] = true
		r.mu.Unlock()
	}
	if !found {
		return nil, nil
	}
	return lease, nil
}

// retireLegacy adopts (unless the new Lease exists already) and deletes the
// pair's Lease of the older naming, if there is one; adopted says whether
// it created the new Lease.
func (r *VolumePairReconciler) retireLegacy(ctx context.Context, vp *v1.VolumePair, haveNew bool) (adopted bool, err error) {
	pair := authority.PairOf(vp)
	old := &coordinationv1.Lease{}
	err = r.APIReader.Get(ctx, client.ObjectKey{Namespace: r.Namespace, Name: authority.LegacyLeaseName(vp.Namespace, vp.Name)}, old)
	switch {
	case apierrors.IsNotFound(err):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("get authority Lease of the older naming: %w", err)
	case !authority.Adoptable(old, pair):
		return false, nil
	}
	if !haveNew {
		l, err := authority.Adopt(old, pair, r.Now())
		if err != nil {
			return false, fmt.Errorf("adopt authority Lease %s: %w", old.Name, err)
		}
		if err := r.Create(ctx, l); err != nil && !apierrors.IsAlreadyExists(err) {
			return false, fmt.Errorf("adopt authority Lease %s as %s: %w", old.Name, l.Name, err)
		}
		adopted = true
		holder, epoch, _ := authority.Holder(l)
		r.Recorder.Eventf(vp, nil, corev1.EventTypeNormal, "AuthorityAdopted", "Adopt",
			"Authority Lease %s (older naming) replaced by %s: %s is the writer at epoch %d", old.Name, l.Name, holder, epoch)
	}
	if err := r.Delete(ctx, old, client.Preconditions{UID: &old.UID}); err != nil && !apierrors.IsNotFound(err) {
		return adopted, fmt.Errorf("delete authority Lease %s of the older naming (an agent not yet upgraded may renew it): %w", old.Name, err)
	}
	return adopted, nil
}

func (r *VolumePairReconciler) createAuthority(ctx context.Context, vp *v1.VolumePair) error {
	l, err := authority.NewLease(r.Namespace, authority.PairOf(vp), vp.Spec.Primary.Node, 1,
		time.Duration(vp.Spec.Failover.LeaseDurationSeconds)*time.Second, r.Now())
	if err != nil {
		return fmt.Errorf("create authority Lease: %w", err)
	}
	if err := r.Create(ctx, l); err != nil {
		if apierrors.IsAlreadyExists(err) {
			return nil // the next round reads it (and checks whose it is)
		}
		return fmt.Errorf("create authority Lease: %w", err)
	}
	r.leases.Observe(l)
	r.Recorder.Eventf(vp, nil, corev1.EventTypeNormal, "AuthorityCreated", "CreateAuthority", "%s is the writer at epoch 1", vp.Spec.Primary.Node)
	return nil
}

// moveAuthority hands the writer role to target with the next epoch. The
// update is conditional on the Lease's resourceVersion, so two controllers
// cannot both promote (no double promotion after a restart either).
func (r *VolumePairReconciler) moveAuthority(ctx context.Context, s *scope, target string, failover bool) error {
	epoch := s.view.Authority.Epoch + 1
	l := s.authority.DeepCopy()
	pair := authority.PairOf(s.vp)
	dur := time.Duration(s.vp.Spec.Failover.LeaseDurationSeconds) * time.Second
	// The writer renews the Lease every second, so the update may conflict
	// with a renewal. Retry on a fresh copy only while it is still this
	// pair's and names the holder and epoch this decision was based on; a
	// failover also needs it to still be expired, which a renewal seen now
	// rules out (the observer sees it change).
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		authority.Move(l, target, epoch, failover, dur, r.Now())
		err := r.Update(ctx, l)
		if err == nil {
			r.leases.Observe(l) // the move: its expiry counts from now
			return nil
		}
		if !apierrors.IsConflict(err) {
			return err
		}
		fresh := &coordinationv1.Lease{}
		if gerr := r.APIReader.Get(ctx, client.ObjectKeyFromObject(l), fresh); gerr != nil {
			return gerr
		}
		if oerr := authority.CheckOwner(fresh, pair); oerr != nil {
			return oerr
		}
		holder, fepoch, herr := authority.Holder(fresh)
		if herr != nil || holder != s.view.Authority.Holder || fepoch != s.view.Authority.Epoch {
			return fmt.Errorf("authority changed meanwhile (now %q at epoch %d, %v): %w", holder, fepoch, herr, err)
		}
		if obs := r.leases.Observe(fresh); failover && !obs.Expired {
			return fmt.Errorf("the writer renewed its authority meanwhile: %w", err)
		}
		l = fresh
		return err
	})
	if err != nil {
		return fmt.Errorf("move authority to %s at epoch %d: %w", target, epoch, err)
	}
	from := s.view.Authority.Holder
	s.view.Authority.Holder, s.view.Authority.Epoch, s.view.Authority.FailedOver = target, epoch, failover
	now2 := metav1.NewTime(r.Now())
	if failover {
		s.vp.Status.LastFailoverTime = &now2
		lostAt := r.probeState(client.ObjectKeyFromObject(s.vp), from).lostAt
		if !lostAt.IsZero() {
			failoverSeconds.Observe(r.Now().Sub(lostAt).Seconds())
		}
		failoversTotal.WithLabelValues(s.vp.Namespace, s.vp.Name).Inc()
		r.Recorder.Eventf(s.vp, nil, corev1.EventTypeWarning, "Failover", "Promote", "Writer %s lost; promoted %s at epoch %d", from, target, epoch)
		if s.view.ForcePromote == target {
			by := s.vp.Annotations[v1.AnnotationForcePromoteBy]
			s.vp.Status.LastForcePromotion = &v1.ForcePromotion{Node: target, From: from, Epoch: int64(epoch), Time: now2,
				RequestedBy: truncate(by, 253), BlockedBy: s.step.ForcedOver}
			who := ""
			if by != "" {
				who = " (requested by " + by + ")"
			}
			r.Recorder.Eventf(s.vp, nil, corev1.EventTypeWarning, "ForcePromoted", "Promote",
				"%s promoted by force at epoch %d%s, overriding %s: writes %s acknowledged that %s lacked are discarded; %s is resynced from %s when it returns",
				target, epoch, who, orNot(s.step.ForcedOver), from, target, from, target)
		}
	} else {
		s.vp.Status.LastFailbackTime = &now2
		if s.step.Handover {
			r.Recorder.Eventf(s.vp, nil, corev1.EventTypeNormal, "Handover", "Switch", "The agent on %s is stopping; writes drained, %s is the writer at epoch %d", from, target, epoch)
		} else {
			r.Recorder.Eventf(s.vp, nil, corev1.EventTypeNormal, "Failback", "Switch", "Writes drained; %s hands the writer role to %s at epoch %d", from, target, epoch)
		}
	}
	return nil
}

// deleteAuthority deletes the pair's own authority Lease, with a UID
// precondition so that only the object read and checked here is deleted,
// and a Lease of the older naming that names this pair. A Lease under the
// pair's name that belongs to another pair is left alone and reported.
func (r *VolumePairReconciler) deleteAuthority(ctx context.Context, vp *v1.VolumePair) error {
	pair := authority.PairOf(vp)
	name, err := authority.LeaseName(vp.UID)
	if err != nil {
		return err
	}
	for _, n := range []string{name, authority.LegacyLeaseName(vp.Namespace, vp.Name)} {
		l := &coordinationv1.Lease{}
		err := r.APIReader.Get(ctx, client.ObjectKey{Namespace: r.Namespace, Name: n}, l)
		switch {
		case apierrors.IsNotFound(err):
			continue
		case err != nil:
			return fmt.Errorf("get authority Lease %s: %w", n, err)
		}
		if n == name {
			if oerr := authority.CheckOwner(l, pair); oerr != nil {
				r.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, BlockedAuthorityNotOwned, "Delete", "Not deleted: %v", oerr)
				continue
			}
		} else if !authority.Adoptable(l, pair) {
			continue // another pair's Lease of the older naming
		}
		if err := r.Delete(ctx, l, client.Preconditions{UID: &l.UID}); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("delete authority Lease %s: %w", n, err)
		}
		r.leases.Forget(l.Namespace, l.Name)
	}
	return nil
}

func orNot(reason string) string {
	if reason == "" {
		return "nothing (it would have been promoted anyway)"
	}
	return reason
}
