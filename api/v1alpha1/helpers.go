package v1alpha1

// SizeBytes returns spec.size in bytes.
func (s *VolumePairSpec) SizeBytes() int64 { return s.Size.Value() }

// RegionSizeBytes returns spec.regionSize in bytes, or the default when unset.
func (s *VolumePairSpec) RegionSizeBytes() int64 {
	if s.RegionSize == nil || s.RegionSize.IsZero() {
		return DefaultRegionSize
	}
	return s.RegionSize.Value()
}

// Regions returns how many bitmap regions the volume has.
func (s *VolumePairSpec) Regions() int64 {
	rs := s.RegionSizeBytes()
	return (s.SizeBytes() + rs - 1) / rs
}

// MergesPrimaryBitmap reports whether a resync ORs the returning member's own
// diff into the copy (the default).
func (s *VolumePairSpec) MergesPrimaryBitmap() bool {
	return s.Resync.MergePrimaryBitmap == nil || *s.Resync.MergePrimaryBitmap
}

// MemberStatus returns the status entry for node, or nil.
func (st *VolumePairStatus) MemberStatus(node string) *MemberStatus {
	for i := range st.Members {
		if st.Members[i].Node == node {
			return &st.Members[i]
		}
	}
	return nil
}

// MemberNodes returns every member's node: spec.primary, spec.backup, then
// each additional backup.
func (s *VolumePairSpec) MemberNodes() []string {
	out := []string{s.Primary.Node, s.Backup.Node}
	for _, b := range s.AdditionalBackups {
		out = append(out, b.Node)
	}
	return out
}

// IsMember reports whether node is one of the pair's members.
func (s *VolumePairSpec) IsMember(node string) bool {
	for _, n := range s.MemberNodes() {
		if n == node {
			return true
		}
	}
	return false
}

// ModeOf returns the replication mode of member node: its own for an
// additional backup that names one, else spec.mode.
func (s *VolumePairSpec) ModeOf(node string) ReplicationMode {
	for _, b := range s.AdditionalBackups {
		if b.Node == node && b.Mode != "" {
			return b.Mode
		}
	}
	return s.Mode
}

// PeerOf returns the other member's node, or "" when node is not a member.
func (s *VolumePairSpec) PeerOf(node string) string {
	switch node {
	case s.Primary.Node:
		return s.Backup.Node
	case s.Backup.Node:
		return s.Primary.Node
	}
	return ""
}
