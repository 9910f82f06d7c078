//! Client data partitions: IID, Dirichlet(alpha) label skew, natural groups, explicit split files. Not built yet.
