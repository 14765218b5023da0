package main

// forget drops what the results hold of a section about to run again, so
// that -update replaces its rows instead of adding a second set (the fio
// sections are replaced by setFio; the others hold single values that a run
// overwrites).
func (r *results) forget(section string) {
	switch section {
	case "resync":
		r.Resync, r.FullCopy = nil, resyncRow{}
	case "scaling":
		r.Scaling = nil
	case "rss":
		r.RSS = nil
	case "backups":
		r.Backups = nil
	}
}
