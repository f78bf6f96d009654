"""Reporting: leaderboard tables (leaderboard), ranked tables, charts and HTML pages (report), and plots
(plots)."""
