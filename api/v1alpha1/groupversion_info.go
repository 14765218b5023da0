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
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

var (
	// GroupVersion is the group and version of the objects in this package.
	GroupVersion = schema.GroupVersion{Group: "storage.tandem.dev", Version: "v1alpha1"}

	// SchemeBuilder registers the types of this package with a runtime.Scheme.
	// It is apimachinery's, not controller-runtime's (deprecated there), so
	// that importing the API does not pull in controller-runtime.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)

	// AddToScheme adds the types of this group-version to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

// addKnownTypes registers the group's kinds and the meta types (ListOptions,
// WatchEvent...) every served group-version needs.
func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion, &VolumePair{}, &VolumePairList{})
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
