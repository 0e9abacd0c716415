# An example of per-point-prefix rights. Use it with
#   [plugins]
#   policy_file = "policies/prefixes.polar"
# Subjects are certificate common names; anything no rule allows is denied.

# Operators and nodes, as in the default policy.
allow("root", _action, _point);
allow(subject: String, "replicate", _point) if subject.starts_with("node:");

# alice reads everything under videos/.
allow("alice", "consume", point: String) if point.starts_with("videos/");
allow("alice", "metadata", point: String) if point.starts_with("videos/");

# The camera uploader writes under cams/ and may see what it wrote.
allow("camera-uploader", "produce", point: String) if point.starts_with("cams/");
allow("camera-uploader", "metadata", point: String) if point.starts_with("cams/");

# Everyone with a certificate may list (metadata on the empty point: GetServers, GetFollowers).
allow(_subject, "metadata", "");
