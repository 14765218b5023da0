// Package v1alpha1 contains the VolumePair API of the storage.tandem.dev group.
//
// A VolumePair declares one block volume kept on two nodes: a preferred primary
// that serves writes and mirrors them, synchronously or asynchronously, to a
// backup. The controller reports the pair's phase (PAIR, SWAP, COPY, NORMAL),
// the acting primary, the authority epoch and the resync progress in status.
//
// +kubebuilder:object:generate=true
// +groupName=storage.tandem.dev
package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

var (
	// GroupVersion is the group and version of the objects in this package.
	GroupVersion = schema.GroupVersion{Group: "storage.tandem.dev", Version: "v1alpha1"}

	// SchemeBuilder registers the types of this package with a runtime.Scheme.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}

	// AddToScheme adds the types of this group-version to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)
